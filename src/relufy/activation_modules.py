"""The torch side of the activation registry: relufy's activation modules and their registration.

`relufy.activations` names and validates activations without importing torch; this module holds
the `nn.Module`s that transformers instantiates. `portable.py` ships their source with checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import PARAMETRIZED, parse_activation


class FATReLU(nn.Module):
    """Thresholded ReLU: x where x >= threshold, else 0 (ProSparse's activation threshold shifting)."""

    def __init__(self, threshold: float = 0.0):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(x < self.threshold, 0.0)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class ShiftedReLU(nn.Module):
    """Shifted ReLU: max(x - shift, 0)."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.shift = float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x - self.shift)

    def extra_repr(self) -> str:
        return f"shift={self.shift}"


def register_with_transformers() -> None:
    """Teach transformers' ACT2FN the parametrized names (`fatrelu_0.01`, `shifted_relu_0.1`).

    Modeling files bind ACT2FN at import, so the mapping object is extended in place: its class
    becomes a subclass that resolves parametrized names on a miss. Idempotent.
    """
    from transformers import activations

    registry = activations.ACT2FN
    if isinstance(registry, _ParametrizedActivations):
        return
    registry.__class__ = type(
        "_RelufyActivations", (_ParametrizedActivations, type(registry)), {"__slots__": ()}
    )


def module_class(name: str) -> type[nn.Module]:
    """The module class of a parametrized family ('fatrelu' -> FATReLU)."""
    return globals()[PARAMETRIZED[name][0]]


class _ParametrizedActivations:
    """Mixin for transformers' ClassInstantier: parametrized ReLU names resolve on a miss."""

    __slots__ = ()

    def __missing__(self, key):
        activation = parse_activation(key) if isinstance(key, str) else None
        if activation is None or activation.name not in PARAMETRIZED:
            raise KeyError(key)
        return module_class(activation.name), {PARAMETRIZED[activation.name][1]: activation.param}

    def __contains__(self, key) -> bool:
        if super().__contains__(key):
            return True
        activation = parse_activation(key) if isinstance(key, str) else None
        return activation is not None and activation.name in PARAMETRIZED
