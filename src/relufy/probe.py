"""The sparsity probe: the one place that reaches x1, the input of each FFN's down projection.

Training (the L1 term), evaluation and the metrics all read x1 through `SparsityProbe`. It
attaches forward pre-hooks and never changes a model's outputs.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import Architecture, architecture_for

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# RELUFY_COMPILE_L1=0 keeps the L1 backward eager on CUDA too (for debugging, or where compiling fails)
COMPILE_L1_BACKWARD = os.environ.get("RELUFY_COMPILE_L1", "1") != "0"


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

    - zero-ratio: exact zeros in x1 / elements, per layer (docs/method.md, section 4);
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
        def record(module: nn.Module, args: tuple) -> tuple | None:
            x1 = args[0]
            tap = self.track_l1 and (self.enabled or (self.replay_l1 and torch.is_grad_enabled()))
            if tap:
                # the down projection consumes the tap's output, so the L1 gradient joins x1's
                # gradient inside L1Tap.backward; while paused (replay) the same ops run, result dropped
                tapped, per_token = L1Tap.apply(x1)
                if self.enabled:  # averaged over tokens in l1_term, all layers in one reduction
                    self._l1_terms.append(per_token if self.token_mask is None else self._masked_mean(per_token))
            if self.enabled:
                if self.count_zeros:
                    with torch.no_grad():
                        self._count(index, x1.detach())
                if self.keep_inputs:
                    self.last_inputs[index] = x1.detach()
            return (tapped, *args[1:]) if tap else None

        return record

    def _masked_mean(self, per_token: torch.Tensor) -> torch.Tensor:
        """Mean over the tokens `token_mask` keeps (unmasked terms are averaged in `l1_term`)."""
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
        terms = self._l1_terms
        if not terms:
            return torch.zeros(())
        if all(term.shape == terms[0].shape for term in terms):
            return torch.stack(terms).reshape(len(terms), -1).mean(1).sum()
        return sum(term.mean() for term in terms)

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


class L1Tap(torch.autograd.Function):
    """Identity on x1 that also returns ||x1_token||_1 over the last dimension (float32, per token).

    The probe's pre-hook hands the down projection the identity's output, so the L1 term's
    gradient, sign(x1) * dL/d(L1_token), is added to the gradient coming back from the down
    projection inside this backward, in one fused pass on CUDA (`add_l1_gradient`), instead of
    flowing through a second autograd branch that autograd then sums into x1's gradient. Saves
    only x1, which the down projection saves anyway; the forward is one read of x1 (float32
    accumulation inside the kernel, per-token result rounded to x1's dtype before the float32
    mean: ~0.4% for bf16, unbiased; the gradient does not depend on it).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x)
        ctx.set_materialize_grads(False)
        return x.view_as(x), torch.linalg.vector_norm(x, ord=1, dim=-1).float()

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor | None, grad_l1: torch.Tensor | None) -> torch.Tensor | None:
        if grad_l1 is None:
            return grad_x
        (x,) = ctx.saved_tensors
        if grad_x is None:
            grad_x = torch.zeros_like(x)
        return add_l1_gradient(grad_x, x, grad_l1)


def _add_l1_gradient(grad: torch.Tensor, x: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    """grad + sign(x) * per_token[..., None], computed in float32, returned in grad's dtype."""
    return (grad.float() + torch.sign(x).float() * per_token.float().unsqueeze(-1)).to(grad.dtype)


@functools.cache
def _compiled_add_l1_gradient():
    return torch.compile(_add_l1_gradient, dynamic=True)


def add_l1_gradient(grad: torch.Tensor, x: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    """The L1 backward added to x1's incoming gradient: one generated kernel on CUDA (reads grad
    and x1 once, writes the sum), the same expression eagerly elsewhere. Inside a compiled model
    (`torch_compile: true`) the plain expression is traced, and Inductor fuses it with its neighbours."""
    if x.is_cuda and COMPILE_L1_BACKWARD and not torch.compiler.is_compiling():
        return _compiled_add_l1_gradient()(grad, x, per_token)
    return _add_l1_gradient(grad, x, per_token)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
