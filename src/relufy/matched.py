"""Matched-sparsity comparison: any model thresholded to a given zero-ratio, then measured.

Models trained differently reach different sparsities, so their quality cannot be compared at
their own. Here each layer l gets a magnitude threshold t_l, chosen on calibration text so that a
`target` fraction of the layer's neurons is zero, and the thresholded model is read like
`relufy evaluate` reads a model: held-out perplexity, and the lm-eval suite with the probe
counting the zeros that reach the down projections.

What the thresholds compare (`threshold_on`):

- `activation` (default): the output s of the FFN's activation module, act(gate(x)) on a gated
  FFN, before the product with up. `ActivationMask` zeroes s where |s| < t_l: FATReLU's own rule
  (it keeps s >= t), so on a ReLU-family model the thresholded model is exactly a FATReLU model
  with threshold t_l in layer l, and its zeros are what the sparse decode kernels skip (the up row
  and the down column of a zero activation). On a SiLU model it is CATS's thresholding.
- `x1`: the down projection's input x1 = s * up (`cett.NeuronMask` without column norms, |x1| <= t_l).
  It ranks neurons by the product with up, so it keeps more of the FFN's output at the same
  zero-ratio, but no activation function computes it and the up projection must run in full.

Calibration goes layer by layer, because thresholding layer l changes the inputs of every later
layer: layer l's threshold is computed with layers 0..l-1 already thresholded, so on the
calibration text every layer reaches the target under the model that is actually measured.
The threshold is an empirical quantile of the magnitudes (the zero-ratio is a step function of t,
and its inverse is exact), so no search is needed; it costs one pass over the calibration text per
layer. A layer that already has at least `target` exact zeros keeps t_l = 0 (nothing can be
un-zeroed), so a sparse model may end above the target: the achieved zero-ratio is reported.

`--uniform` gives every layer the same t instead (`calibrate_uniform`): with `activation` on a
ReLU-family model that is the model `relufy convert --activation fatrelu --threshold t` writes.
Comparing the two says what per-layer calibration buys.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .architectures import activation_modules, activation_name
from .cett import LayerMask, NeuronMask, thresholded_perplexity
from .checkpoint import model_name
from .checks import block_fits_context
from .data import heldout_blocks
from .errors import DataError
from .harness import run_suite
from .metrics import batches
from .options import MatchedConfig
from .report import with_stderr
from .scores import group_averages, group_stderrs
from .suites import task_manager


def magnitude_quantile(x1: torch.Tensor, target: float) -> float:
    """The smallest t with a fraction >= `target` of |x1| <= t: the k-th smallest |x1|, k = ceil(target * n).

    Exact zeros are among the smallest, so a layer that already has `target` zeros gets t = 0.
    """
    flat = x1.abs().flatten()
    k = min(flat.numel(), max(1, math.ceil(target * flat.numel() - 1e-9)))
    return float(flat.kthvalue(k).values)


def strict_quantile(values: torch.Tensor, target: float) -> float:
    """The smallest t, among the magnitudes themselves, with a fraction >= `target` of |values| < t or
    exactly zero: the magnitude just above the k-th smallest (FATReLU's `<`), or 0 when zeros suffice."""
    kth = magnitude_quantile(values, target)
    if kth == 0.0:
        return 0.0
    above = values.abs().flatten()
    above = above[above > kth]
    return float(above.min()) if above.numel() else float(torch.nextafter(torch.tensor(kth), torch.tensor(math.inf)))


class ActivationMask(LayerMask):
    """Forward hooks that zero each FFN activation's output where |s| < t_l, and count the zeros left.

    Registered on the modules `architectures.activation_modules` names, so whatever the FFN does
    with s afterwards (the product with up, the down projection) sees the thresholded s.
    """

    def __init__(self, model: nn.Module):
        super().__init__(activation_modules(model))

    def _register(self, index: int, module: nn.Module):
        def mask(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            kept = output.masked_fill(output.abs() < self.thresholds[index], 0)
            self._count(index, kept == 0)
            return kept

        return module.register_forward_hook(mask)

    def watch(self, layer: int, rows: list[torch.Tensor]):
        """Append each forward's thresholded s of `layer` to `rows` (a hook after the mask's; remove it)."""
        return self.modules[layer].register_forward_hook(
            lambda module, args, output: rows.append(output.reshape(-1, output.shape[-1]).float().cpu()))

    quantile = staticmethod(strict_quantile)


class X1Mask(NeuronMask):
    """`cett.NeuronMask` without column norms (|x1| <= t_l on the down projection's input), with what
    calibration needs from a mask: `watch` and `quantile`."""

    def watch(self, layer: int, rows: list[torch.Tensor]):
        """Append each forward's thresholded x1 of `layer` to `rows` (a pre-hook after the mask's; remove it)."""
        return self.modules[layer].register_forward_pre_hook(
            lambda module, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).float().cpu()))

    quantile = staticmethod(magnitude_quantile)


def threshold_mask(model: nn.Module, threshold_on: str = "activation") -> ActivationMask | X1Mask:
    """The mask whose thresholds compare what `threshold_on` names ('activation' or 'x1')."""
    masks = {"activation": ActivationMask, "x1": X1Mask}
    if threshold_on not in masks:
        raise ValueError(f"threshold_on must be 'activation' or 'x1', got {threshold_on!r}")
    return masks[threshold_on](model)


@torch.no_grad()
def calibrate(model: nn.Module, blocks: torch.Tensor, target: float, *, batch_size: int = 8,
              threshold_on: str = "activation") -> list[float]:
    """Per-layer magnitude thresholds that make each layer a `target` fraction zeros on `blocks`.

    One pass per layer: layer l's values are collected with layers 0..l-1 thresholded (its own
    threshold and the later ones at 0, which changes nothing), so later layers are calibrated
    on the activations the thresholded model really produces.
    """
    device = next(model.parameters()).device
    mask = threshold_mask(model, threshold_on)
    thresholds = [0.0] * len(mask.modules)
    for layer in range(len(thresholds)):
        rows: list[torch.Tensor] = []
        with mask:
            mask.set(thresholds)
            handle = mask.watch(layer, rows)
            try:
                for batch in batches(blocks, batch_size, device):
                    model(input_ids=batch)
            finally:
                handle.remove()
        thresholds[layer] = mask.quantile(torch.cat(rows), target)
    return thresholds


@torch.no_grad()
def calibrate_uniform(model: nn.Module, blocks: torch.Tensor, target: float, *, batch_size: int = 8,
                      tolerance: float = 1e-3, steps: int = 30, threshold_on: str = "activation") -> float:
    """One magnitude threshold for every layer whose zero-ratio, averaged over the layers, is `target`
    on `blocks` (within `tolerance`, else the closest bracket end at or above it after `steps` bisections).

    The zero-ratio grows with t: each layer drops more of its inputs, and what a threshold upstream moves
    downstream is small beside that. So t is bisected, one thresholded pass over `blocks` per step, from
    [0, the first doubling of 1 that reaches the target]. A model with `target` zeros of its own gets 0.
    """
    mask = threshold_mask(model, threshold_on)

    def zero_ratio(threshold: float) -> float:
        _, per_layer = thresholded_perplexity(model, blocks, mask, [threshold] * len(mask.modules),
                                              batch_size=batch_size)
        return _mean(per_layer)

    if zero_ratio(0.0) >= target:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(64):
        if zero_ratio(high) >= target:
            break
        low, high = high, 2 * high
    for _ in range(steps):
        middle = 0.5 * (low + high)
        reached = zero_ratio(middle)
        if abs(reached - target) <= tolerance:
            return middle
        low, high = (middle, high) if reached < target else (low, middle)
    return high


def text_blocks(config: MatchedConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity blocks, calibration blocks), never overlapping when both come from the held-out text."""
    size = config.block_size
    if config.calibration is not None:
        return (heldout_blocks(config.heldout, tokenizer, block_size=size, max_tokens=config.heldout_tokens),
                heldout_blocks(config.calibration, tokenizer, block_size=size, max_tokens=config.calibration_tokens))
    wanted = config.heldout_tokens // size, config.calibration_tokens // size
    blocks = heldout_blocks(config.heldout, tokenizer, block_size=size, max_tokens=sum(wanted) * size)
    if len(blocks) < sum(wanted):
        raise DataError(f"'{config.heldout}' holds {len(blocks)} blocks of {size} tokens; perplexity and calibration "
                        f"need {wanted[0]} + {wanted[1]} separate ones. Lower --heldout-tokens or "
                        "--calibration-tokens, or pass other text with --calibration")
    return blocks[: wanted[0]], blocks[wanted[0]:]


def measure_target(model, tokenizer, target: float, blocks: tuple[torch.Tensor, torch.Tensor],
                   config: MatchedConfig, suite_plan=None) -> dict:
    """Calibrate the thresholds for one target, then perplexity, zero-ratios and (optionally) the suite."""
    heldout, calibration = blocks
    mask = threshold_mask(model, config.threshold_on)
    if config.uniform:
        threshold = calibrate_uniform(model, calibration, target, batch_size=config.batch_size,
                                      threshold_on=config.threshold_on)
        thresholds = [threshold] * len(mask.modules)
    else:
        thresholds = calibrate(model, calibration, target, batch_size=config.batch_size,
                               threshold_on=config.threshold_on)
    _, calibrated = thresholded_perplexity(model, calibration, mask, thresholds, batch_size=config.batch_size)
    ppl, per_layer = thresholded_perplexity(model, heldout, mask, thresholds, batch_size=config.batch_size)
    entry = {"target": target, "thresholds": thresholds, "ppl": ppl,
             "zero_ratio": _mean(per_layer), "per_layer": per_layer,
             "calibration_zero_ratio": _mean(calibrated), "calibration_per_layer": calibrated}
    if suite_plan is not None:
        plan, manager = suite_plan
        with mask:  # registered before the suite's probe, so the probe counts the thresholded x1
            mask.set(thresholds)
            suite = run_suite(model, tokenizer, plan, manager, config.suite_options())
        entry.update(lm_eval=suite.harness, scores=group_averages(suite.harness, plan.groups),
                     scores_stderr=group_stderrs(suite.harness, plan.groups), sparsity=suite.sparsity())
    return entry


def matched_sparsity(model_src: str, output: str | Path, config: MatchedConfig, *, force: bool = False) -> dict:
    """Measure `model_src` thresholded to every target of `config`; write the results JSON to `output`."""
    from .atomic import claim_output, signed, write_text_atomically
    from .checkpoint import resolve_source

    config.check()
    source = resolve_source(model_src)
    inputs = [source.on_disk, config.heldout, config.calibration]
    with claim_output(output, command="relufy matched", force=force, inputs=inputs, kind="file") as output:
        results = _measure_matched(source, config)
        write_text_atomically(output, signed(results, "relufy matched", what=str(output)))
    return results


def _measure_matched(source, config: MatchedConfig) -> dict:
    """The dense model's perplexity and zero-ratio, then each target's thresholds and measurements."""
    from .checkpoint import load_model, load_tokenizer, model_identity, read_config

    suite_plan = None
    if config.run_suite:
        plan = config.suite_options().plan()
        suite_plan = (plan, task_manager(list(plan.tasks)))
    block_fits_context("--block-size", config.block_size, read_config(source), source)
    tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    blocks = text_blocks(config, tokenizer)
    model = load_model(source, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    model = model.to(config.device).eval()
    mask = threshold_mask(model, config.threshold_on)
    layers = len(mask.modules)
    dense_ppl, dense_zeros = thresholded_perplexity(model, blocks[0], mask, [0.0] * layers,
                                                    batch_size=config.batch_size)
    return {
        "model": str(source), "model_name": model_name(source), "activation": activation_name(model),
        "identity": model_identity(source, activation_name(model)),  # relufy convert --layer-thresholds checks it
        "relufy_version": __version__, "layers": layers,
        "heldout": {"source": str(config.heldout), "tokens": int(blocks[0].numel()), "block_size": config.block_size},
        "calibration": {"source": str(config.calibration or config.heldout), "tokens": int(blocks[1].numel())},
        "dense": {"ppl": dense_ppl, "zero_ratio": _mean(dense_zeros), "per_layer": dense_zeros},
        "targets": [measure_target(model, tokenizer, target, blocks, config, suite_plan)
                    for target in config.targets],
        "settings": asdict(config),
    }


def matched_table(results: list[dict], names: list[str] | None = None) -> str:
    """Markdown: one row per model and target, with the dense model's perplexity for reference."""
    lines = ["| model | target | zero-ratio (held-out) | zero-ratio (lm-eval) | perplexity | dense perplexity "
             "| suite average |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, result in zip(names or [r["model_name"] for r in results], results):
        settings = result.get("settings", {})
        name += " (one threshold)" if settings.get("uniform") else ""
        name += " (x1 thresholds)" if settings.get("threshold_on") == "x1" else ""
        for entry in result["targets"]:
            lm_zeros = entry.get("sparsity", {}).get("overall")
            suite = with_stderr(entry.get("scores", {}).get("average"), entry.get("scores_stderr", {}).get("average"))
            lines.append(f"| {name} | {entry['target']:.2%} | {entry['zero_ratio']:.2%} | "
                         f"{'-' if lm_zeros is None else f'{lm_zeros:.2%}'} | {entry['ppl']:.3f} | "
                         f"{result['dense']['ppl']:.3f} | {suite} |")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
