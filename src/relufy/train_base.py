"""The checkpoint `relufy train` starts from: the recipe's base as it is, its conversion to the recipe's
activation, or (for a GGUF base) its dequantized copy; made once in converted_model_dir and reused by
a later run or a resume, recognised by the `relufy` provenance entry of its config.json.

A run resolves the recipe's base once (`Base.resolve`: a hub id fetched, `pkg:` expanded, links followed)
and reads its config once; the conversion, the checks, the loads and the resume fingerprint all take
that `Base` instead of resolving and reading the checkpoint again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .activations import parse_activation
from .architectures import architecture_of
from .checkpoint import Source, read_config, read_provenance, resolve_source
from .errors import RecipeError
from .recipe import Recipe, resolve_model_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Base:
    """A checkpoint of a training run, resolved and its config read once."""

    source: Source
    config: dict

    @classmethod
    def resolve(cls, value: str | Path) -> Base:
        """The checkpoint a recipe value names (a folder, a .gguf file, `pkg:<package>/<file>` or a hub id)."""
        source = resolve_source(resolve_model_path(str(value)))
        return cls(source, read_config(source))

    @property
    def activation(self) -> str:
        """The FFN activation its config names (`silu`, `relu`, `fatrelu_0.01`...)."""
        return architecture_of(self.config).activation_of(self.config)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def prepare_base(recipe: Recipe, base: Base | None = None) -> Base:
    """The checkpoint training starts from: the recipe's base (`base`, resolved once by the caller, or here)
    itself, or its conversion (made once, reused)."""
    from accelerate import PartialState

    from .activations import Activation
    from .convert import convert_checkpoint

    args = recipe.model
    base = base or Base.resolve(args.model_name_or_path)
    if args.activation is None:
        return _dequantized_base(recipe, base)
    activation: Activation = parse_activation(args.activation)
    if parse_activation(str(base.activation)) == activation:
        return base  # already converted: train it as it is
    target = Path(args.converted_model_dir or Path(recipe.training.output_dir) / f"base-{activation.config_value}")
    with PartialState().main_process_first():
        if not _is_conversion_of(target, str(base.source), activation.config_value):
            if target.exists():
                raise RecipeError(f"converted_model_dir {target} exists but is not a '{activation.config_value}' "
                                  f"conversion of {base.source}; remove it or choose another converted_model_dir")
            target.parent.mkdir(parents=True, exist_ok=True)
            logger.info("converting %s to %s in %s", base.source, activation.config_value, target)
            convert_checkpoint(base.source, target, activation)
    return Base.resolve(target)


def _dequantized_base(recipe: Recipe, base: Base) -> Base:
    """A base trained with its own activation: as it is, or, for a GGUF file (which the Trainer refuses as
    quantized), its plain safetensors copy in converted_model_dir (default <output_dir>/base-dequantized)."""
    from accelerate import PartialState

    from .convert import dequantize_checkpoint

    if not base.source.gguf_file:
        return base
    target = Path(recipe.model.converted_model_dir or Path(recipe.training.output_dir) / "base-dequantized")
    with PartialState().main_process_first():
        provenance = read_provenance(target)
        if not (provenance.dequantized and provenance.source == str(base.source)):
            if target.exists():
                raise RecipeError(f"converted_model_dir {target} exists but is not a dequantized copy of "
                                  f"{base.source}; remove it or choose another converted_model_dir")
            target.parent.mkdir(parents=True, exist_ok=True)
            logger.info("dequantizing %s into %s (its activation kept)", base.source, target)
            dequantize_checkpoint(base.source, target)
    return Base.resolve(target)


def _is_conversion_of(target: Path, source: str, activation: str) -> bool:
    provenance = read_provenance(target)
    return provenance.source == source and provenance.activation == activation
