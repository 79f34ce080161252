"""Threshold shifting after training (docs/method.md, section 3): the largest FATReLU threshold whose
held-out perplexity stays within a bound, found by bisection and written into the saved config."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from .activations import module_class, parse_activation
from .architectures import architecture_of, ffn_modules
from .checkpoint import Provenance, update_config
from .errors import TrainingError


@dataclass(frozen=True)
class ThresholdSearch:
    """What the search after training may spend and accept: the relative perplexity increase allowed, the
    largest threshold tried, the bisection steps and the held-out tokens per measurement. A recipe spells
    these as its threshold_* keys, whose defaults are these (`ProSparseConfig.threshold_search`)."""

    max_ppl_increase: float = 0.01
    threshold_max: float = 0.05
    steps: int = 6
    max_tokens: int = 8192


def set_threshold(model: nn.Module, threshold: float) -> int:
    """Replace the ReLU/FATReLU of every FFN by FATReLU(threshold) in place; return how many were swapped."""
    fatrelu = module_class("fatrelu")
    swapped = 0
    for ffn in ffn_modules(model):
        for name, child in ffn.named_children():
            if isinstance(child, (nn.ReLU, fatrelu)):
                setattr(ffn, name, fatrelu(threshold))
                swapped += 1
    return swapped


def calibrate_threshold(model: nn.Module, blocks, search: ThresholdSearch) -> dict:
    """Largest FATReLU threshold in [0, threshold_max] whose held-out perplexity stays within the bound.

    Perplexity is assumed to grow with the threshold: the search tries `threshold_max`, then
    bisects `steps` times. The result is rounded down to two significant digits and measured.
    """
    from .metrics import measure_sparsity

    max_ppl_increase, threshold_max = search.max_ppl_increase, search.threshold_max

    def measure(threshold: float) -> dict:
        if threshold > 0 and set_threshold(model, threshold) == 0:
            raise TrainingError("threshold shift needs a ReLU or FATReLU model; this one has neither in its FFNs")
        result = measure_sparsity(model, blocks, max_tokens=search.max_tokens, progress=False)
        tried.append({"threshold": threshold, "perplexity": result["perplexity"], "sparsity": result["overall"]})
        return result

    tried: list[dict] = []
    before = measure(0.0)
    bound = before["perplexity"] * (1 + max_ppl_increase)
    if measure(threshold_max)["perplexity"] <= bound:
        best = threshold_max
    else:
        low, high = 0.0, threshold_max
        for _ in range(search.steps):
            middle = (low + high) / 2
            low, high = (middle, high) if measure(middle)["perplexity"] <= bound else (low, middle)
        best = _round_down(low)
    after = measure(best) if best > 0 else before
    if best > 0 and after["perplexity"] > bound:  # rounding cannot raise it, but measure to be sure
        best, after = 0.0, before
    return {"threshold": best, "max_ppl_increase": max_ppl_increase,
            "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
            "sparsity_before": before["overall"], "sparsity_after": after["overall"],
            "held_out_tokens": after["tokens"], "tried": tried}


def _round_down(value: float, digits: int = 2) -> float:
    if value <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.floor(value * scale) / scale


def shift_threshold(output_dir: Path, held_out, search: ThresholdSearch, *, device,
                    trust_remote_code: bool = False) -> dict:
    """Calibrate the threshold on the saved model in `output_dir` with `search` (a recipe's threshold_* keys), and
    record it there (the activation, and the search under `relufy.threshold_shift`)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from .activations import Activation
    from .checkpoint import load_model
    from .portable import write_remote_code

    unset_hf_deepspeed_config()  # reload on this process alone, never partitioned
    model = load_model(output_dir, dtype="float32", trust_remote_code=trust_remote_code).to(device)
    arch = architecture_of(model.config)
    current = parse_activation(str(arch.activation_of(model.config)))
    if current is None or current.name not in ("relu", "fatrelu"):
        raise TrainingError(f"threshold_shift needs a relu or fatrelu model, this one uses "
                            f"'{arch.activation_of(model.config)}'; set threshold_shift: false")
    result = calibrate_threshold(model, held_out, search)
    activation = Activation("fatrelu", result["threshold"]) if result["threshold"] > 0 else current

    def record(config: dict) -> None:
        arch.with_activation(config, activation.config_value)
        # provenance names the activation in use
        config["relufy"] = replace(Provenance.of(config), threshold_shift=result,
                                   activation=activation.config_value).to_dict()

    update_config(output_dir, record)
    write_remote_code(output_dir)
    del model
    return result
