"""The checkpoint `relufy train` starts from: the recipe's base as it is, its conversion to the recipe's
activation, or (for a GGUF base) its dequantized copy; made once in converted_model_dir and reused by
a later run or a resume, recognised by the `relufy` provenance entry of its config.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .activations import parse_activation
from .architectures import architecture_of
from .checkpoint import read_provenance
from .errors import RecipeError
from .recipe import Recipe, resolve_model_path

logger = logging.getLogger(__name__)


def prepare_base(recipe: Recipe) -> str:
    """The checkpoint training starts from: the base itself, or its conversion (made once, reused)."""
    from accelerate import PartialState

    from .activations import Activation
    from .checkpoint import read_config, resolve_source
    from .convert import convert_checkpoint

    args = recipe.model
    base = resolve_model_path(args.model_name_or_path)
    if args.activation is None:
        return _dequantized_base(recipe, base)
    activation: Activation = parse_activation(args.activation)
    source = resolve_source(base)
    config = read_config(source)
    current = architecture_of(config).activation_of(config)
    if parse_activation(str(current)) == activation:
        return base  # already converted: train it as it is
    target = Path(args.converted_model_dir or Path(recipe.training.output_dir) / f"base-{activation.config_value}")
    with PartialState().main_process_first():
        if not _is_conversion_of(target, str(source), activation.config_value):
            if target.exists():
                raise RecipeError(f"converted_model_dir {target} exists but is not a '{activation.config_value}' "
                                  f"conversion of {source}; remove it or choose another converted_model_dir")
            target.parent.mkdir(parents=True, exist_ok=True)
            logger.info("converting %s to %s in %s", source, activation.config_value, target)
            convert_checkpoint(base, target, activation)
    return str(target)


def _dequantized_base(recipe: Recipe, base: str) -> str:
    """A base trained with its own activation: as it is, or, for a GGUF file (which the Trainer refuses as
    quantized), its plain safetensors copy in converted_model_dir (default <output_dir>/base-dequantized)."""
    from accelerate import PartialState

    from .checkpoint import resolve_source
    from .convert import dequantize_checkpoint

    source = resolve_source(base)
    if not source.gguf_file:
        return base
    target = Path(recipe.model.converted_model_dir or Path(recipe.training.output_dir) / "base-dequantized")
    with PartialState().main_process_first():
        provenance = read_provenance(target)
        if not (provenance.dequantized and provenance.source == str(source)):
            if target.exists():
                raise RecipeError(f"converted_model_dir {target} exists but is not a dequantized copy of {source}; "
                                  "remove it or choose another converted_model_dir")
            target.parent.mkdir(parents=True, exist_ok=True)
            logger.info("dequantizing %s into %s (its activation kept)", source, target)
            dequantize_checkpoint(base, target)
    return str(target)


def _is_conversion_of(target: Path, source: str, activation: str) -> bool:
    provenance = read_provenance(target)
    return provenance.source == source and provenance.activation == activation
