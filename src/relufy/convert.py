"""Turning a Swish/GELU checkpoint into a ReLU-family one, atomically and without touching the source.

A safetensors checkpoint is converted by rewriting config.json: the shards are copied (or
hard-linked with `link=True`) byte for byte and never loaded. A GGUF source is dequantized once
and written as safetensors.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from . import __version__
from .activations import Activation, parse_activation
from .architectures import Architecture, architecture_for
from .atomic import MARKER, atomic_directory, claim_output
from .checkpoint import Provenance, Source, read_config, resolve_source, update_config
from .errors import ActivationError, AlreadyConvertedError, OutputExistsError, SourceError, UnsupportedArchitectureError
from .portable import write_remote_code

logger = logging.getLogger(__name__)

_SKIP = {"config.json", ".git", ".cache", ".gitattributes", MARKER}


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    activation: Activation,
    *,
    force: bool = False,
    link: bool = False,
    dtype: str = "float32",
    layer_thresholds: list[float] | None = None,
) -> Path:
    """Write a copy of `src` whose FFN activation is `activation` to `out`; return `out`.

    `layer_thresholds` (with `activation` the bare `fatrelu`, `per_layer.PER_LAYER`) go into the config as one
    FATReLU threshold per FFN layer.

    `force` replaces an existing `out` and converts a model that already uses `activation`.
    `link` hard-links weight files instead of copying them (same filesystem only; a later
    in-place write to one side would change both). `dtype` applies to GGUF sources only.
    """
    from .per_layer import PER_LAYER, checked

    if (activation == PER_LAYER) != (layer_thresholds is not None):
        raise ActivationError("the bare 'fatrelu' and layer_thresholds go together: one FATReLU threshold per layer")
    if layer_thresholds is not None:
        layer_thresholds = checked(layer_thresholds, None, "layer_thresholds")
    out = Path(out).expanduser().resolve()
    source = resolve_source(src)
    _check_parent(out)
    with claim_output(out, command="relufy convert", force=force, inputs=[source.on_disk]):
        config = read_config(source)
        arch = architecture_for(config.get("model_type"))
        old_value = _current_activation(config, arch)
        if parse_activation(old_value) == activation and not force:
            raise AlreadyConvertedError(
                f"{source} already uses '{old_value}'; nothing to convert (pass --force to write a copy anyway)")
        provenance = conversion_provenance(config, source, old_value, activation.config_value)
        with atomic_directory(out, replace=force, command="relufy convert") as tmp:
            if source.gguf_file:
                dequantize_gguf(source, tmp, arch, activation, dtype)
            else:
                copy_checkpoint(source.path, tmp, link)
            _rewrite_config(tmp, arch, activation, provenance, None if source.gguf_file else config,
                            layer_thresholds)
            if activation.needs_relufy:
                write_remote_code(tmp)
    logger.info("converted %s (%s -> %s) into %s", source, old_value, activation.config_value, out)
    return out


def conversion_provenance(config: dict, source: Source, old_value: str, activation: str) -> Provenance:
    """The `relufy` entry of a conversion of `source` (whose config is `config`): a source relufy made (trained,
    shifted, converted) passes its record on, with `original_activation` still the untouched model's, so that
    a per-layer conversion of a trained checkpoint does not read as a conversion of its shifted activation
    and keeps its training record; a model relufy never touched starts the record."""
    earlier = Provenance.of(config)
    return replace(earlier, source=str(source), original_activation=earlier.original_activation or old_value,
                   activation=activation, relufy_version=__version__)


def dequantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Write a GGUF source to `out` as plain safetensors, keeping its own activation; return `out`.

    Training needs it: the Trainer refuses a model loaded from GGUF (it counts as quantized), so a
    run that keeps the original activation (the SiLU control) starts from this copy, just as a
    converted run starts from its conversion. Provenance records the activation as it is.
    """
    out = Path(out).expanduser().resolve()
    source = resolve_source(src)
    if not source.gguf_file:
        raise SourceError(f"{source} is not a GGUF file; only GGUF sources need dequantizing")
    _check_parent(out)
    config = read_config(source)
    arch = architecture_for(config.get("model_type"))
    activation = _current_activation(config, arch)
    provenance = Provenance(source=str(source), original_activation=activation, activation=activation,
                            dequantized=True, relufy_version=__version__)
    with claim_output(out, command="relufy train (dequantize)", force=False, inputs=[source.on_disk]), \
            atomic_directory(out, replace=False, command="relufy train (dequantize)") as tmp:
        dequantize_gguf(source, tmp, arch, None, dtype)
        update_config(tmp, lambda config: config.update(relufy=provenance.to_dict()))
    logger.info("dequantized %s (%s kept) into %s", source, activation, out)
    return out


def _current_activation(config: dict, arch: Architecture) -> str:
    value = arch.activation_of(config)
    if not value:
        raise UnsupportedArchitectureError(
            f"model_type '{arch.model_type}' has no FFN activation in config key '{arch.activation_key}'; "
            "fix activation_key for it in convert/architectures.yaml")
    return value


def _check_parent(out: Path) -> None:
    """OUT's folder must exist: a typo in it should not silently create a new tree. (What OUT may be is
    `check_output`'s rule; a GGUF source is its one file, so `model-relu/` beside `model.gguf` is allowed.)"""
    if not out.parent.is_dir():
        raise OutputExistsError(f"the parent directory of OUT ({out.parent}) does not exist; create it first")


def copy_checkpoint(src: Path, dst: Path, link: bool) -> None:
    """Copy the checkpoint's files but config.json (rewritten later); weights are never loaded.

    Subdirectories (training checkpoints, `original/` consolidated weights...) are not part of
    the loadable model and are left out.
    """
    for entry in sorted(src.iterdir()):
        if entry.name in _SKIP:
            continue
        target = dst / entry.name
        if entry.is_dir():
            logger.info("not copying subdirectory %s", entry)
        elif link:
            try:
                os.link(entry.resolve(), target)
            except OSError:  # another filesystem: fall back to a copy
                _copy_file(entry, target)
        else:
            _copy_file(entry, target)


def _copy_file(src: Path, dst: Path) -> None:
    """Copy in the kernel with copy_file_range (a reflink on btrfs/XFS), else shutil's copy.

    Follows symlinks (hub cache entries are links into blobs/).
    """
    try:
        with src.open("rb") as source, dst.open("wb") as target:
            remaining = os.fstat(source.fileno()).st_size
            while remaining > 0:
                copied = os.copy_file_range(source.fileno(), target.fileno(), remaining)
                if copied == 0:
                    break
                remaining -= copied
        if remaining == 0:
            return
    except (AttributeError, OSError):  # no copy_file_range here, or not across these filesystems
        pass
    shutil.copyfile(src, dst)


def _rewrite_config(directory: Path, arch: Architecture, activation: Activation, provenance: Provenance,
                    source_config: dict | None = None, layer_thresholds: list[float] | None = None) -> None:
    """Write the converted config.json once: `source_config` (a directory source's config, which the copy
    leaves out) or the one the GGUF rebuild saved, with the new activation (and its per-layer thresholds) and
    the provenance."""
    from .per_layer import LAYER_THRESHOLDS_KEY

    def change(config: dict) -> None:
        config.update(source_config or {})
        arch.with_activation(config, activation.config_value)
        config.pop(LAYER_THRESHOLDS_KEY, None)
        if layer_thresholds is not None:
            config[LAYER_THRESHOLDS_KEY] = list(layer_thresholds)
        config["relufy"] = provenance.to_dict()

    update_config(directory, change)


def dequantize_gguf(source: Source, dst: Path, arch: Architecture, activation: Activation | None,
                     dtype: str) -> None:
    """Load the GGUF once (dequantizing), rebuild a plain model with the new activation (None: its own), save it
    into `dst`: the weights step of `convert_checkpoint` and `dequantize_checkpoint` on a GGUF source."""
    import torch
    from transformers import AutoModelForCausalLM

    from .activations import register_activations
    from .checkpoint import load_model, load_tokenizer

    try:
        quantized = load_model(source, dtype="float32")
        tokenizer = load_tokenizer(source)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{source} could not be loaded as a GGUF model ({exc})") from None
    config = quantized.config
    if activation is not None:
        arch.with_activation(config, activation.config_value)
    config.dtype = dtype
    if hasattr(config, "quantization_config"):  # the weights are plain tensors from here on
        del config.quantization_config
    register_activations()  # the rebuilt model builds the new activation by its name
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    rebuilt.load_state_dict(quantized.state_dict())
    rebuilt.generation_config = quantized.generation_config
    rebuilt.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
