"""The architecture map: what relufy knows about each model_type, loaded from convert/architectures.yaml, and the
FFN modules, activation modules and down projections of a loaded model that it names (`ffn_modules`,
`activation_modules`, `down_projections`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .errors import UnsupportedArchitectureError
from .paths import project_file

if TYPE_CHECKING:
    from torch import nn

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Architecture:
    """How to find and change the FFN activation of one model_type."""

    model_type: str
    activation_key: str
    ffn: str
    gated: bool
    down: str
    act: str
    up: str | None = None
    gate: str | None = None
    gate_up: str | None = None

    def activation_of(self, config) -> str | None:
        """The FFN activation a config names (`silu`, `relu`, `fatrelu_0.01`...), from a config.json dict or a
        transformers config; None when the key is absent."""
        value = config.get(self.activation_key) if isinstance(config, dict) else \
            getattr(config, self.activation_key, None)
        return None if value is None else str(value)

    def with_activation(self, config, activation: str):
        """Write the FFN activation string into `config` (dict or transformers config) in place; return it."""
        if isinstance(config, dict):
            config[self.activation_key] = activation
        else:
            setattr(config, self.activation_key, activation)
        return config


def map_path() -> Path:
    """The YAML map: the packaged copy in a wheel, the repository's in a source checkout."""
    return project_file("convert/architectures.yaml")


@lru_cache(maxsize=1)
def load_map() -> dict[str, Architecture]:
    entries = yaml.safe_load(map_path().read_text())
    return {model_type: Architecture(model_type=model_type, **fields) for model_type, fields in entries.items()}


def architecture_for(model_type: str | None) -> Architecture:
    """The map entry for `model_type`, or an error that says how to add one."""
    known = load_map()
    if model_type in known:
        return known[model_type]
    raise UnsupportedArchitectureError(
        f"model_type '{model_type}' is not supported (supported: {', '.join(sorted(known))}); "
        f"add an entry for it to {map_path()}"
    )


def architecture_of(config) -> Architecture:
    """The map entry for a config.json dict or a transformers config (by its model_type)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return architecture_for(model_type)


def activation_name(model) -> str:
    """The FFN activation as a loaded model's config names it (silu, relu, fatrelu_0.01, ...): what results
    files record."""
    return str(architecture_of(model.config).activation_of(model.config))


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


def activation_modules(model: nn.Module, arch: Architecture | None = None) -> list[nn.Module]:
    """The activation module of every FFN in layer order (the `act_fn` transformers built from the config);
    on a gated FFN its output is act(gate(x)), before the product with up."""
    arch = arch or architecture_for(getattr(model.config, "model_type", None))
    return [getattr(ffn, arch.act) for ffn in ffn_modules(model, arch)]
