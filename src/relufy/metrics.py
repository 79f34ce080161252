"""Sparsity and perplexity measured over packed text blocks, through the probe."""

from __future__ import annotations

import math

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
    device = next(model.parameters()).device
    block_size = len(blocks[0]["input_ids"])
    count = len(blocks)
    if max_tokens is not None:
        count = min(count, max(1, max_tokens // block_size))
    loss_sum, predicted = 0.0, 0
    with SparsityProbe(model, threshold=threshold) as probe:
        for start in tqdm(range(0, count, batch_size), desc="measuring sparsity", unit="batch",
                          disable=not progress):
            rows = blocks[start: min(start + batch_size, count)]["input_ids"]
            input_ids = torch.tensor(rows, device=device)
            loss, count = token_loss(model, input_ids)
            loss_sum, predicted = loss_sum + loss, predicted + count
        result = probe.summary()
    result["loss"] = loss_sum / predicted
    result["perplexity"] = perplexity(result["loss"])
    return result


def token_loss(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy of packed blocks (no padding) and the number of predicted tokens."""
    logits = model(input_ids=input_ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             input_ids[:, 1:].reshape(-1), reduction="sum")
    return float(loss), input_ids[:, 1:].numel()


def perplexity(mean_loss: float) -> float:
    """exp(mean loss), capped so that a broken model reports a huge number rather than an overflow."""
    return math.exp(min(mean_loss, 700.0))
