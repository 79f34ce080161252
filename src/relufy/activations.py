"""ReLU and its variants: their names in a config, their torch modules, their registration with transformers.

A converted config stores the activation as one string under the architecture's activation key
(read and written only through `Architecture.activation_of` / `with_activation`):

| config value        | function                         | loads with plain transformers |
| ------------------- | -------------------------------- | ----------------------------- |
| `relu`              | max(x, 0)                        | yes                           |
| `relu2`             | max(x, 0)^2 (Primer, ReLU^2 Wins)| yes                           |
| `fatrelu_<t>`       | x if x >= t else 0 (ProSparse)   | with `trust_remote_code=True` (the shipped `modeling_relufy.py`), or after `register_activations()` |
| `shifted_relu_<b>`  | max(x - b, 0)                    | with `trust_remote_code=True`, or after `register_activations()` |
| `fatrelu`           | FATReLU with threshold t_l in layer l, listed in `relufy_layer_thresholds` (`per_layer.py`) | with `trust_remote_code=True`, or relufy's loader |

The parameter lives in the name because transformers builds every FFN activation as
`ACT2FN[config.<key>]` with no arguments.

Importing this module costs no torch: `import relufy`, the CLI's parser, the recipe's validation and a
safetensors conversion (which never loads weights) only need the names. FATReLU and ShiftedReLU
subclass `torch.nn.Module`, so they are defined inside `_module_classes()` on its first call, which
imports torch then and returns the one mapping family -> class; `module_class("fatrelu")` is how
code reaches a class. Nothing happens on import: `register_activations()` teaches transformers the
names when relufy's loaders (or a user) call it.
"""

from __future__ import annotations

import copyreg
import functools
import math
import re
from dataclasses import dataclass

from .errors import ActivationError

# parametrized family -> keyword of its parameter (the module's constructor argument and attribute).
# relu and relu2 are transformers' own.
PARAMETRIZED = {"fatrelu": "threshold", "shifted_relu": "shift"}
ACTIVATIONS = ("relu", "fatrelu", "shifted_relu", "relu2")
_PARAMETRIZED_NAME = re.compile(rf"^({'|'.join(PARAMETRIZED)})_(.+)$")


@dataclass(frozen=True)
class Activation:
    """One ReLU-family activation: its family name and parameter (threshold or shift)."""

    name: str
    param: float | None = None

    @property
    def config_value(self) -> str:
        """The string written into the model config's activation key."""
        return self.name if self.param is None else f"{self.name}_{self.param!r}"

    def module(self):
        """A fresh activation module (torch.nn.Module), exactly as transformers builds it from the config."""
        from transformers.activations import ACT2FN

        register_activations()
        return ACT2FN[self.config_value]

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
    if config_value in ("relu", "relu2", "fatrelu"):  # bare fatrelu: one threshold per layer (per_layer.py)
        return Activation(config_value)
    match = _PARAMETRIZED_NAME.match(config_value or "")
    if match is None:
        return None
    try:
        return Activation(match.group(1), float(match.group(2)))
    except ValueError:
        return None


def module_class(family: str) -> type:
    """The torch module class of a parametrized family ('fatrelu' -> FATReLU); imports torch."""
    return _module_classes()[family]


@functools.cache
def _module_classes() -> dict[str, type]:
    """Define the torch modules once, on first use (see the module docstring: no torch on import).

    `portable.py` ships these classes' source with checkpoints, so they use only torch.
    """
    import torch
    from torch import nn

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

    classes = {"fatrelu": FATReLU, "shifted_relu": ShiftedReLU}
    for family, cls in classes.items():
        # pickle (torch.save(model), copy.deepcopy) finds a class by its qualified name, which a class
        # defined in a function does not have; copyreg's table tells it to rebuild one by family instead
        copyreg.pickle(cls, functools.partial(_reduce_parametrized, family))
    return classes


def _reduce_parametrized(family: str, module) -> tuple:
    """How pickle rebuilds a FATReLU / ShiftedReLU: a fresh one of the family, then its state (hooks included)."""
    return _build_parametrized, (family, getattr(module, PARAMETRIZED[family])), module.__dict__


def _build_parametrized(family: str, param: float):
    return module_class(family)(param)


def register_activations() -> None:
    """Teach transformers' `ACT2FN` relufy's parametrized names (`fatrelu_0.01`, `shifted_relu_0.1`).

    Call it before building a model whose config names one; relufy's own loaders do. Cheap and
    idempotent; it imports torch and transformers.

    transformers has no API to register an activation, and no table can list every threshold, so
    ACT2FN has to resolve these names when they are missing. `OrderedDict` asks `__missing__` only of
    a subclass that defines it, and modeling files bound the ACT2FN object itself when they were
    imported, so that object cannot be replaced: it is given (by `__class__` assignment) a subclass
    of its own class that adds `__missing__` and `__contains__`.
    """
    from transformers import activations

    registry = activations.ACT2FN
    if not isinstance(registry, _ParametrizedActivations):
        registry.__class__ = type("RelufyActivations", (_ParametrizedActivations, type(registry)), {"__slots__": ()})


class _ParametrizedActivations:
    """Mixin for transformers' ClassInstantier: parametrized ReLU names resolve on a miss."""

    __slots__ = ()

    def __missing__(self, key):
        activation = parse_activation(key) if isinstance(key, str) else None
        if activation is None or activation.name not in PARAMETRIZED:
            raise KeyError(key)
        if activation.param is None:
            raise ActivationError(
                f"'{key}' keeps one threshold per FFN layer in config.relufy_layer_thresholds, which transformers "
                "cannot build by itself: load the model with relufy (relufy.checkpoint.load_model, the relufy CLI) "
                "or with trust_remote_code=True")
        return module_class(activation.name), {PARAMETRIZED[activation.name]: activation.param}

    def __contains__(self, key) -> bool:
        if super().__contains__(key):
            return True
        activation = parse_activation(key) if isinstance(key, str) else None
        # the bare fatrelu too, so transformers' `get_activation` (Falcon) asks `__missing__`, whose error says how
        # to load a per-layer model
        return activation is not None and activation.name in PARAMETRIZED
