"""The sparsity probe: reads x1, the input of each FFN's down projection, without changing outputs.

Evaluation, the metrics and the speed harness measure x1 through `SparsityProbe`; CETT and matched
sparsity sample it; training taps it for the L1 term (the term and its autograd op are `l1.py`'s).
Which of these a probe does is fixed by the constructor that built it: `for_measurement`,
`for_sampling` or `for_training`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import down_projections
from .l1 import L1Tap, L1Term


@dataclass
class LayerCounts:
    """Running sums for one layer, kept as tensors on the model's device (no sync per step)."""

    zeros: torch.Tensor | float = 0.0
    below: torch.Tensor | float = 0.0
    elements: int = 0
    tokens: int = 0


@dataclass
class SparsityProbe:
    """Records x1 statistics on every forward while attached (use as a context manager).

    Always: the zero-ratio (exact zeros in x1 / elements, per layer; docs/method.md, section 4) and,
    with a `threshold`, the ratio of |x1| <= threshold, unless `count_zeros` is off. The constructor
    adds one job: `for_sampling` keeps each layer's x1 of the last forward (detached, for CETT and
    thresholds); `for_training` taps x1 for the L1 term (`pop_l1`).

    `token_mask` (bool, batch x seq) restricts the statistics to real tokens when set.
    `enabled = False` pauses all recording. A training probe still runs its L1 ops while paused and
    autograd is recording, their result dropped: activation-checkpointing recomputation during backward
    then saves exactly the tensors the original forward saved, and no forward is counted twice
    (training pauses the probe between forward and backward). That replay is part of `for_training`,
    so it cannot be forgotten.
    """

    model: nn.Module
    threshold: float = 0.0
    token_mask: torch.Tensor | None = None
    enabled: bool = True
    count_zeros: bool = True  # False skips the zero/threshold counts (e.g. on training steps nobody logs)
    keep_inputs: bool = field(default=False, init=False)  # set by for_sampling
    l1: L1Term | None = field(default=None, init=False)  # set by for_training
    layers: list[LayerCounts] = field(default_factory=list, init=False)
    last_inputs: list[torch.Tensor | None] = field(default_factory=list, init=False)
    _handles: list = field(default_factory=list, init=False)
    _mask_cache: tuple | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.modules = down_projections(self.model)
        self.reset()

    # -- the three jobs ------------------------------------------------------------------------
    @classmethod
    def for_measurement(cls, model: nn.Module, threshold: float = 0.0,
                        token_mask: torch.Tensor | None = None) -> "SparsityProbe":
        """Counts only: the zero-ratio of x1 (and the ratio below `threshold`) per layer."""
        return cls(model, threshold=threshold, token_mask=token_mask)

    @classmethod
    def for_sampling(cls, model: nn.Module) -> "SparsityProbe":
        """Keeps each layer's x1 of the last forward in `last_inputs`, and counts its zeros."""
        probe = cls(model)
        probe.keep_inputs = True
        return probe

    @classmethod
    def for_training(cls, model: nn.Module, count_zeros: bool = True) -> "SparsityProbe":
        """Taps x1 for the L1 term (replayed under activation checkpointing) and counts zeros; the trainer
        switches `enabled` and `count_zeros` per step and reads the term with `pop_l1`."""
        probe = cls(model, count_zeros=count_zeros)
        probe.l1 = L1Term()
        return probe

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self) -> "SparsityProbe":
        if not self._handles:
            self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "SparsityProbe":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget all counts (start of a new measurement)."""
        self.layers = [LayerCounts() for _ in self.modules]
        self.last_inputs = [None for _ in self.modules]
        if self.l1 is not None:
            self.l1.pop()

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    # -- the hook ----------------------------------------------------------------------------
    def _hook(self, index: int):
        def record(module: nn.Module, args: tuple) -> tuple | None:
            x1 = args[0]
            tap = self.l1 is not None and (self.enabled or torch.is_grad_enabled())
            if tap:
                # the down projection consumes the tap's output, so the L1 gradient joins x1's
                # gradient inside L1Tap.backward; while paused (replay) the same ops run, result dropped
                tapped, per_token = L1Tap.apply(x1)
                if self.enabled:
                    self.l1.add(per_token, self.token_mask)
            if self.enabled:
                if self.count_zeros:
                    with torch.no_grad():
                        self._count(index, x1.detach())
                if self.keep_inputs:
                    self.last_inputs[index] = x1.detach()
            return (tapped, *args[1:]) if tap else None

        return record

    def _count(self, index: int, x1: torch.Tensor) -> None:
        counts = self.layers[index]
        width = x1.shape[-1]
        # per-token counts, then the token mask: no boolean indexing, which would synchronise
        # with the GPU in every layer, and no full-size masked copy
        zeros = (x1 == 0).sum(-1)
        below = (x1.abs() <= self.threshold).sum(-1) if self.threshold > 0 else None
        if self.token_mask is None:
            tokens = x1.numel() // width
        else:
            mask, tokens = self._mask_on(x1.device)
            zeros = zeros * mask
            below = below * mask if below is not None else None
        counts.zeros = counts.zeros + zeros.sum()
        if below is not None:
            counts.below = counts.below + below.sum()
        counts.elements += tokens * width
        counts.tokens += tokens

    def _mask_on(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """`token_mask` as a (batch, seq) bool tensor on `device` and its token count, once per mask."""
        cache = self._mask_cache  # holds the mask object itself, so `is` cannot match a recycled id
        if cache is None or cache[0] is not self.token_mask or cache[1] != device:
            mask = self.token_mask.to(device, torch.bool)
            cache = self._mask_cache = (self.token_mask, device, mask, int(self.token_mask.sum()))
        return cache[2], cache[3]

    # -- results -------------------------------------------------------------------------------
    def pop_l1(self) -> torch.Tensor:
        """The L1 term of the forwards since the last call, cleared (one call per training forward)."""
        if self.l1 is None:
            raise ValueError("this probe does not tap the L1 term; build it with SparsityProbe.for_training")
        return self.l1.pop()

    def zero_ratio_per_layer(self) -> list[float]:
        return [float(c.zeros) / c.elements if c.elements else float("nan") for c in self.layers]

    def below_threshold_per_layer(self) -> list[float]:
        if self.threshold <= 0:
            return self.zero_ratio_per_layer()
        return [float(c.below) / c.elements if c.elements else float("nan") for c in self.layers]

    @property
    def tokens(self) -> int:
        return self.layers[0].tokens if self.layers else 0

    def summary(self) -> dict:
        """`overall`, `per_layer` (exact zeros) and `tokens`; with a threshold, the same below it."""
        per_layer = self.zero_ratio_per_layer()
        result = {"overall": _mean(per_layer), "per_layer": per_layer, "tokens": self.tokens}
        if self.threshold > 0:
            below = self.below_threshold_per_layer()
            result.update(threshold=self.threshold, overall_below_threshold=_mean(below),
                          per_layer_below_threshold=below)
        return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
