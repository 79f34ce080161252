"""The activation registry: ReLU and its variants, and their registration with transformers.

A converted config stores the activation as one string in the architecture's activation key
(`hidden_act`, `hidden_activation`, `activation_function`, `activation`):

| config value        | function                         | loads without relufy |
| ------------------- | -------------------------------- | -------------------- |
| `relu`              | max(x, 0)                        | yes                  |
| `relu2`             | max(x, 0)^2 (Primer, ReLU^2 Wins)| yes                  |
| `fatrelu_<t>`       | x if x >= t else 0 (ProSparse)   | after `import relufy`, or with the shipped remote code |
| `shifted_relu_<b>`  | max(x - b, 0)                    | after `import relufy`, or with the shipped remote code |

The parameter lives in the name because transformers builds every FFN activation as
`ACT2FN[config.<key>]` with no arguments.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ActivationError


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


# name -> (module class, keyword of its parameter or None). relu/relu2 are transformers' own.
PARAMETRIZED = {"fatrelu": (FATReLU, "threshold"), "shifted_relu": (ShiftedReLU, "shift")}
ACTIVATIONS = ("relu", "fatrelu", "shifted_relu", "relu2")
_PARAMETRIZED_NAME = re.compile(r"^(fatrelu|shifted_relu)_(.+)$")


@dataclass(frozen=True)
class Activation:
    """One ReLU-family activation: its family name and parameter (threshold or shift)."""

    name: str
    param: float | None = None

    @property
    def config_value(self) -> str:
        """The string written into the model config's activation key."""
        return self.name if self.param is None else f"{self.name}_{self.param!r}"

    def module(self) -> nn.Module:
        """A fresh activation module, exactly as transformers will build it from the config."""
        if self.name == "relu":
            return nn.ReLU()
        if self.name == "relu2":
            from transformers.activations import ReLUSquaredActivation

            return ReLUSquaredActivation()
        cls, keyword = PARAMETRIZED[self.name]
        return cls(**{keyword: self.param})

    @property
    def needs_relufy(self) -> bool:
        """True when plain transformers cannot build this activation by itself."""
        return self.name in PARAMETRIZED


def make_activation(name: str, threshold: float | None = None, shift: float | None = None) -> Activation:
    """Validate user input (CLI or recipe) and return the activation it names."""
    if name not in ACTIVATIONS:
        raise ActivationError(f"unknown activation '{name}'. Supported: {', '.join(ACTIVATIONS)}")
    if name == "fatrelu":
        return Activation(name, _check_param("--threshold", 0.0 if threshold is None else threshold))
    if name == "shifted_relu":
        return Activation(name, _check_param("--shift", 0.0 if shift is None else shift))
    for flag, value in (("--threshold", threshold), ("--shift", shift)):
        if value is not None:
            raise ActivationError(f"{flag} does not apply to '{name}'; use --activation fatrelu or shifted_relu")
    return Activation(name)


def _check_param(flag: str, value: float) -> float:
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ActivationError(f"{flag} must be a finite number >= 0, got {value}")
    return value


def parse_activation(config_value: str) -> Activation | None:
    """The ReLU-family activation a config value names, or None for any other (silu, gelu...)."""
    if config_value in ("relu", "relu2"):
        return Activation(config_value)
    match = _PARAMETRIZED_NAME.match(config_value or "")
    if match is None:
        return None
    try:
        return Activation(match.group(1), float(match.group(2)))
    except ValueError:
        return None


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


class _ParametrizedActivations:
    """Mixin for transformers' ClassInstantier: parametrized ReLU names resolve on a miss."""

    __slots__ = ()

    def __missing__(self, key):
        activation = parse_activation(key) if isinstance(key, str) else None
        if activation is None or activation.name not in PARAMETRIZED:
            raise KeyError(key)
        cls, keyword = PARAMETRIZED[activation.name]
        return cls, {keyword: activation.param}

    def __contains__(self, key) -> bool:
        if super().__contains__(key):
            return True
        activation = parse_activation(key) if isinstance(key, str) else None
        return activation is not None and activation.name in PARAMETRIZED
