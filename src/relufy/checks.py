"""Checks of options and inputs, shared by every command so that a bad value fails the same way everywhere.

Each command checks its options once, in one place (its options dataclass's `__post_init__`, or the
CLI's runner where there is none), before any model loads; a failure is one `DataError` naming the
flag, the value and what is accepted. The checks that need the model's config (a block size against
its context) run once the config is read, before its weights load. Results are checked too: a
measurement that is NaN or infinite is an error, never a table row, and no JSON relufy writes holds a
bare NaN (`json_text`).

Importing this module imports no torch; `device_available` imports it when called.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import MISSING, field
from typing import Any, NewType

from .errors import DataError, ResultError, SourceError

COUNT_LIMIT = 1 << 40  # a ceiling for token and example counts: far above any run, below absurd typos
BATCH_LIMIT = 1 << 16  # sequences per batch
DTYPES = ("auto", "float32", "bfloat16", "float16")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_in_range(name: str, value, low: int, high: int) -> int:
    """`value` as an integer in [low, high]; anything else is one line naming `name` and the range."""
    if not _is_int(value) or not low <= value <= high:
        raise DataError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def positive_int(name: str, value, high: int = COUNT_LIMIT) -> int:
    return int_in_range(name, value, 1, high)


def number_in_range(name: str, value, low: float, high: float, *, low_open: bool = False,
                    high_open: bool = False) -> float:
    """A finite number in the interval; NaN, infinities and values outside are one line naming `name`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{_shown(low)}, {_shown(high)}{')' if high_open else ']'}"
        raise DataError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def _shown(bound: float) -> str:
    """A bound as a person writes it: 1099511627776 rather than 1.09951e+12, inf as inf."""
    return str(int(bound)) if math.isfinite(bound) and float(bound).is_integer() else f"{bound:g}"


def supported_dtype(name: str, value: str, allowed: tuple[str, ...] = DTYPES) -> str:
    if value not in allowed:
        raise DataError(f"{name} {value}: not a supported dtype; choose one of {', '.join(allowed)}")
    return value


def device_available(device: str, name: str = "--device") -> str:
    """`device` if torch can place a model there now: cuda (and its index) only with a visible CUDA device."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DataError(f"{name} {device}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return device
    if parsed.type not in ("cuda", "mps", "xpu"):
        raise DataError(f"{name} {device}: relufy runs models on cpu, cuda or cuda:N (mps, xpu where present)")
    backend = getattr(torch, parsed.type, None)
    available = backend is not None and backend.is_available()
    if not available:
        raise DataError(f"{name} {device}: no {parsed.type.upper()} device is visible; use {name} cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise DataError(f"{name} {device}: only {count} {parsed.type.upper()} device(s) are visible "
                        f"({parsed.type}:0 to {parsed.type}:{count - 1})")
    return device


def resolve_device(device: str | None, name: str = "--device") -> str:
    """`device` checked (`device_available`), or when None the default, chosen only now: cuda when torch sees
    one, else cpu. Asking torch while a parser is built would make every command, --help too, import it."""
    if device:
        return device_available(device, name)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# A list option's type on the command line: its text ("1,4,16"), which the options dataclass's
# `__post_init__` splits with `listed` (there the flag's name is known, so a bad item is one line
# naming it); YAML and Python callers pass a list or tuple instead.
def option(default: Any = MISSING, help: str = "", **kwargs) -> Any:
    """A dataclass field that is a command-line option or recipe key: `default` and `help` (what
    `HfArgumentParser` shows), `default_factory` / `kw_only` as `dataclasses.field` takes them, and any other
    keyword (`aliases`, `action`, `metavar`) into the metadata, which argparse receives as it is."""
    field_keys = {"default_factory", "kw_only"}
    metadata = {"help": help, **{key: value for key, value in kwargs.items() if key not in field_keys}}
    return field(default=default, metadata=metadata, **{key: kwargs[key] for key in field_keys & kwargs.keys()})


CommaList = NewType("CommaList", str)


def listed(name: str, value, convert: Callable = str, what: str = "") -> tuple:
    """The items of a list option: a comma-separated string, or a sequence whose items may be such strings
    too (an option given several times); blanks skipped. An item `convert` rejects is one line naming `name`."""
    items = value if isinstance(value, (list, tuple)) else [value]
    texts = [part.strip() if isinstance(part, str) else part
             for item in items for part in (item.split(",") if isinstance(item, str) else [item])]
    try:
        return tuple(convert(item) for item in texts if not isinstance(item, str) or item)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be {what or 'a comma-separated list'}, got '{value}'") from None


def context_length(config: dict) -> int | None:
    """The longest sequence the model's positions cover, as its config states it (None: not stated)."""
    for key in CONTEXT_KEYS:
        value = config.get(key)
        if _is_int(value) and value > 0:
            return value
    return None


def block_fits_context(name: str, block_size: int, config: dict, source) -> None:
    """A block longer than the model's context would index past its position table: refuse it while only the
    config is read, before the weights load."""
    limit = context_length(config)
    if limit is not None and block_size > limit:
        raise DataError(f"{name} {block_size} is longer than {source}'s context of {limit} tokens; use "
                        f"{name} {limit} or less")


def non_finite(value, path: str = "") -> Iterator[str]:
    """The places (`a.b[2]`) of NaN and infinite floats in nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path or "value"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from non_finite(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from non_finite(item, f"{path}[{index}]")


def finite_config(config: dict, where) -> dict:
    """A config whose numbers are all finite, activation parameters included: JSON's NaN or Infinity in one
    (`"rms_norm_eps": NaN`, `"hidden_act": "fatrelu_nan"`) would load a model that computes NaN, or zeroes
    nothing, and reports it as a measurement."""
    from .activations import parse_activation

    bad = next(non_finite(config), None)
    if bad is not None:
        raise SourceError(f"{where}: '{bad}' is not a finite number; restore the model's value")
    for key, value in config.items():
        activation = parse_activation(value) if isinstance(value, str) else None
        if activation is not None and activation.param is not None and not math.isfinite(activation.param):
            raise SourceError(f"{where}: '{key}' is '{value}', whose parameter is not a finite number; "
                              "restore the model's value")
    return config


def finite_results(results, what: str) -> None:
    """A measurement holding NaN or infinity is an error: the model (or its dtype) produced non-finite outputs."""
    bad = next(non_finite(results), None)
    if bad is not None:
        raise ResultError(f"{what}: '{bad}' came out NaN or infinite, so the model's outputs are not finite; "
                          "check its weights and config.json, or run it in --dtype float32")


def json_text(payload, what: str) -> str:
    """The one JSON dump of relufy's results: indented, and never with a bare NaN (which is not JSON)."""
    finite_results(payload, what)
    return json.dumps(payload, indent=2, default=str, allow_nan=False) + "\n"
