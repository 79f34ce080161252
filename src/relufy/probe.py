"""The sparsity probe: the one place that reaches x1, the input of each FFN's down projection.

Training (the L1 term), evaluation and the metrics all read x1 through `SparsityProbe`. It
attaches forward pre-hooks and never changes a model's outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import Architecture, architecture_for

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def ffn_modules(model: nn.Module, arch: Architecture | None = None) -> list[nn.Module]:
    """Every FFN module of `model`, in layer order (as the architecture map names them)."""
    arch = arch or architecture_for(getattr(model.config, "model_type", None))
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if name.endswith(f".{arch.ffn}") and hasattr(module, arch.down):
            match = _LAYER_INDEX.findall(name)
            if match:
                found.setdefault(int(match[-1]), module)
    if not found:
        raise ValueError(f"no FFN modules named '{arch.ffn}' with a '{arch.down}' in {type(model).__name__}")
    return [found[index] for index in sorted(found)]


def down_projections(model: nn.Module, arch: Architecture | None = None) -> list[nn.Module]:
    """The down projection of every FFN in layer order; their input is x1."""
    arch = arch or architecture_for(getattr(model.config, "model_type", None))
    return [getattr(ffn, arch.down) for ffn in ffn_modules(model, arch)]


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

    - zero-ratio: exact zeros in x1 / elements, per layer (METHOD.md section 4);
    - below-threshold ratio: |x1| <= `threshold`, for any activation;
    - `l1`: with `track_l1`, the differentiable L1 term of the last forward: sum over layers of
      the mean over tokens of ||x1_token||_1 (the normalisation relufy's lambda refers to).
    - `keep_inputs`: keep each layer's x1 of the last forward (detached) for metrics like CETT.

    `token_mask` (bool, batch x seq) restricts the statistics to real tokens when set.
    `enabled = False` pauses all recording. With `replay_l1` (and `track_l1`), the L1 ops still
    run while paused and autograd is recording, their result dropped: activation-checkpointing
    recomputation during backward then saves exactly the tensors the original forward saved,
    and no forward is counted twice (training pauses the probe between forward and backward).
    """

    model: nn.Module
    threshold: float = 0.0
    track_l1: bool = False
    keep_inputs: bool = False
    token_mask: torch.Tensor | None = None
    layers: list[LayerCounts] = field(default_factory=list)
    last_inputs: list[torch.Tensor | None] = field(default_factory=list)
    _l1_terms: list[torch.Tensor] = field(default_factory=list)
    _handles: list = field(default_factory=list)
    _mask_cache: tuple | None = None
    enabled: bool = True
    replay_l1: bool = False
    count_zeros: bool = True  # False skips the zero/threshold counts (e.g. on training steps nobody logs)

    def __post_init__(self) -> None:
        self.modules = down_projections(self.model)
        self.reset()

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
        self._l1_terms = []

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    # -- the hook ----------------------------------------------------------------------------
    def _hook(self, index: int):
        def record(module: nn.Module, args: tuple) -> None:
            x1 = args[0]
            if not self.enabled:
                if self.replay_l1 and self.track_l1 and torch.is_grad_enabled():
                    self._l1_of(x1)  # same ops as the forward; see the class docstring
                return
            if self.track_l1:
                self._l1_terms.append(self._l1_of(x1))
            if self.count_zeros:
                with torch.no_grad():
                    self._count(index, x1.detach())
            if self.keep_inputs:
                self.last_inputs[index] = x1.detach()

        return record

    def _l1_of(self, x1: torch.Tensor) -> torch.Tensor:
        """Mean over (masked) tokens of ||x1_token||_1, accumulated in float32."""
        return self._masked_mean(TokenL1.apply(x1))

    def _masked_mean(self, per_token: torch.Tensor) -> torch.Tensor:
        if self.token_mask is None:
            return per_token.mean()
        mask = self.token_mask.to(per_token.device, per_token.dtype)
        return (per_token * mask).sum() / mask.sum().clamp_min(1)

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
    def l1_term(self) -> torch.Tensor:
        """The L1 term of the forwards since the last `pop_l1` (zero if none)."""
        if not self._l1_terms:
            return torch.zeros(())
        return torch.stack(self._l1_terms).sum()

    def pop_l1(self) -> torch.Tensor:
        """Return the L1 term and clear it (one call per training forward)."""
        term = self.l1_term()
        self._l1_terms = []
        return term

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


class TokenL1(torch.autograd.Function):
    """||x||_1 over the last dimension as float32, with a backward that stays in x's dtype.

    Autograd's own `vector_norm(x, 1, dtype=float32)` copies x to float32 in the forward, and its
    backward upcasts sign(x) and the product to float32 full-size tensors and casts back; this one
    computes sign(x) * grad in x's dtype (two elementwise passes), which matters for bf16 training.
    Saves only x (already saved by the down projection).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        # One pass, float32 accumulation inside the kernel; the per-token result is rounded to x's
        # dtype (bf16: ~0.4%, unbiased) before the float32 mean. vector_norm(dtype=float32) would
        # copy x to float32 first. The gradient does not depend on this value.
        return torch.linalg.vector_norm(x, ord=1, dim=-1).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.sign(x).mul_(grad.unsqueeze(-1).to(x.dtype))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
