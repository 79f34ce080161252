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

import importlib.abc
import importlib.util
import math
import re
import sys
from dataclasses import dataclass

from .errors import ActivationError


# parametrized family -> (class in relufy.activation_modules, keyword of its parameter).
# relu and relu2 are transformers' own.
PARAMETRIZED = {"fatrelu": ("FATReLU", "threshold"), "shifted_relu": ("ShiftedReLU", "shift")}
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

    def module(self):
        """A fresh activation module (torch.nn.Module), exactly as transformers builds it from the config."""
        from transformers.activations import ACT2FN

        from .activation_modules import register_with_transformers

        register_with_transformers()
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
    if config_value in ("relu", "relu2"):
        return Activation(config_value)
    match = _PARAMETRIZED_NAME.match(config_value or "")
    if match is None:
        return None
    try:
        return Activation(match.group(1), float(match.group(2)))
    except ValueError:
        return None


def register_on_transformers_import() -> None:
    """Register relufy's activations with transformers now, or as soon as transformers loads them.

    Keeps `import relufy` free of torch/transformers (fast CLI start-up) while guaranteeing that
    any later `from_pretrained` sees `fatrelu_<t>` and `shifted_relu_<b>`.
    """
    if "transformers.activations" in sys.modules:
        from .activation_modules import register_with_transformers

        register_with_transformers()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds transformers.activations through the normal finders and registers right after it executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers.activations":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_then_register(module):
            execute(module)
            from .activation_modules import register_with_transformers

            register_with_transformers()

        spec.loader.exec_module = execute_then_register
        return spec


def __getattr__(name: str):
    """The torch-side names (`FATReLU`, `ShiftedReLU`, `register_with_transformers`), imported on first use."""
    if name in ("FATReLU", "ShiftedReLU", "register_with_transformers"):
        from . import activation_modules

        return getattr(activation_modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
