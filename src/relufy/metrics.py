"""Sparsity and perplexity measured over packed text blocks, through the probe.

`mean_token_loss` is the one perplexity pass: `measure_sparsity` runs it with the probe attached,
`cett` (PPL-p% sparsity) and `relufy matched` with their x1 thresholds hooked in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .probe import SparsityProbe


@torch.no_grad()
def measure_sparsity(model, blocks, *, threshold: float = 0.0, batch_size: int = 4,
                     max_tokens: int | None = None, progress: bool = True) -> dict:
    """Zero-ratio of x1 per layer and overall (docs/method.md, section 4), plus held-out perplexity.

    `blocks` is a sequence of rows with `input_ids` of one length (see `data.pack_blocks`).
    Returns the probe's summary with `perplexity` and `loss` added.
    """
    model.eval()
    block_size = len(blocks[0]["input_ids"])
    count = len(blocks)
    if max_tokens is not None:
        count = min(count, max(1, max_tokens // block_size))
    input_ids = torch.tensor(blocks[:count]["input_ids"], dtype=torch.long)
    with SparsityProbe.for_measurement(model, threshold=threshold) as probe:
        loss = mean_token_loss(model, input_ids, batch_size=batch_size, desc="measuring sparsity", progress=progress)
        result = probe.summary()
    result["loss"] = loss
    result["perplexity"] = perplexity(loss)
    return result


@torch.no_grad()
def mean_token_loss(model, blocks: torch.Tensor, *, batch_size: int = 4, after_batch: Callable[[], None] | None = None,
                    desc: str = "", progress: bool = False) -> float:
    """Mean next-token cross-entropy of `model` over packed token blocks (blocks x length, no padding).

    Whatever hooks the caller attached (the probe, x1 thresholds) see every forward; `after_batch`
    runs after each one, while their per-forward state is fresh (PPL-p%'s dense pass keeps a sample
    of the x1 the probe saw).
    """
    device = next(model.parameters()).device
    loss_sum, predicted = 0.0, 0
    for batch in batches(blocks, batch_size, device, desc=desc, progress=progress):
        loss, count = token_loss(model, batch)
        loss_sum, predicted = loss_sum + loss, predicted + count
        if after_batch is not None:
            after_batch()
    return loss_sum / predicted


def batches(blocks: torch.Tensor, batch_size: int, device, *, desc: str = "", progress: bool = False):
    """Rows of `blocks` in batches of `batch_size`, moved to `device` (a bar only for passes of 4+ batches:
    a shorter pass is one step of its caller's bar)."""
    starts = range(0, len(blocks), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 4, leave=False):
        yield blocks[start: start + batch_size].to(device)


def token_loss(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy of packed blocks (no padding) and the number of predicted tokens."""
    logits = model(input_ids=input_ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             input_ids[:, 1:].reshape(-1), reduction="sum")
    return float(loss), input_ids[:, 1:].numel()


def perplexity(mean_loss: float) -> float:
    """exp(mean loss), capped so that a broken model reports a huge number rather than an overflow."""
    return math.exp(min(mean_loss, 700.0))
