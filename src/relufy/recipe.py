"""Training recipes: one flat YAML of `transformers.TrainingArguments` keys plus relufy's own keys.

The recipe's keys are the fields of three argument groups (`relufy.configs`): `ModelArguments`
(the base and its conversion), `DataArguments` (the text and its packing) and `ProSparseConfig`,
a `TrainingArguments` that adds `stages:`, `max_train_minutes`, the threshold shift and LoRA mode.
`HfArgumentParser` types and validates them (`parse_recipe`). Any key can be overridden with
`--set dotted.key=value` (`--set stages.2.lambda=0.1`); values are read as YAML. Every problem is
a `RecipeError` that names the key and the fix. A key written twice in one mapping is refused with both
lines (`StrictLoader`), where plain YAML would silently keep the last value.

Relative input paths written in a recipe file (`model_name_or_path`, `data`, `held_out_data`) resolve
against the recipe file's folder, so a recipe and its data can travel together and the recipe works
from any directory; paths given with `--set` and every output path (`output_dir`,
`converted_model_dir`) resolve against the current directory, like any command-line path.

This module imports neither torch nor transformers at import time: the CLI reads `--help` without them.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .checkpoint import PACKAGE_PREFIX, package_file
from .errors import DataError, RecipeError, SourceError

if TYPE_CHECKING:
    from .configs import DataArguments, ModelArguments, ProSparseConfig
    from .schedule import Schedule

INPUT_PATH_KEYS = ("model_name_or_path", "data", "held_out_data", "distill_teacher")
REQUIRED_KEYS = ("model_name_or_path", "data", "output_dir")
# A value with one of these suffixes (or starting with ./ ../ / ~) names a local file, never a hub name.
FILE_SUFFIXES = (".txt", ".md", ".text", ".json", ".jsonl", ".gz", ".gguf", ".safetensors")


@dataclass
class Recipe:
    """A validated recipe: its three argument groups (`relufy.configs`) and where it was read from."""

    model: ModelArguments
    data: DataArguments
    training: ProSparseConfig  # the Trainer's arguments, with the schedule, threshold shift and LoRA keys
    source: Path | None = None
    recipe_relative: dict = field(default_factory=dict)  # input key -> the relative path written in the file

    @property
    def schedule(self) -> Schedule:
        """lambda(step): the recipe's `stages`, held by `training`."""
        return self.training.stages


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                base: dict | None = None) -> Recipe:
    """Read a recipe YAML (or start from `base`), apply `--set` overrides, validate, and parse it."""
    data = dict(base or {})
    source = None
    written: dict[str, tuple[str, str]] = {}
    if path is not None:
        source = Path(path)
        data.update(read_yaml(source))
        written = _resolve_against(data, source.parent)
    for override in overrides:
        apply_override(data, override)
    recipe = parse_recipe(data, source)
    recipe.recipe_relative = {key: text for key, (text, resolved) in written.items() if data.get(key) == resolved}
    return recipe


def looks_local(value: str) -> bool:
    """Whether a model/data value names a local file (not a hub or datasets name)."""
    return value.startswith(("./", "../", "/", "~")) or value.lower().endswith(FILE_SUFFIXES)


def _resolve_against(data: dict, folder: Path) -> dict[str, tuple[str, str]]:
    """Make the recipe's relative input paths relative to `folder`; return {key: (written, resolved)}."""
    written = {}
    for key in INPUT_PATH_KEYS:
        value = data.get(key)
        if not isinstance(value, str) or value.startswith((PACKAGE_PREFIX, "/", "~")):
            continue
        candidate = os.path.normpath(folder / value)
        if looks_local(value) or Path(candidate).exists():
            data[key] = candidate
            written[key] = (value, candidate)
    return written


def check_inputs(recipe: Recipe) -> None:
    """Fail before any work when a local model or data path of the recipe does not exist."""
    values = {"model_name_or_path": recipe.model.model_name_or_path, "data": recipe.data.data,
              "held_out_data": recipe.data.held_out_data, "distill_teacher": recipe.training.distill_teacher}
    for key, value in values.items():
        if not value or value.startswith(PACKAGE_PREFIX) or not looks_local(value):
            continue
        if Path(value).expanduser().exists():
            continue
        where = "" if os.path.isabs(value) else f" (relative to the current directory {Path.cwd()})"
        if key in recipe.recipe_relative:
            where = (f" (the recipe says '{recipe.recipe_relative[key]}'; relative paths in a recipe resolve against "
                     f"its folder {recipe.source.parent.resolve()})")
        hint = recipe.data.data_hint
        model_key = key in ("model_name_or_path", "distill_teacher")
        fix = hint if not model_key and hint else f"fix it or pass --set {key}=PATH"
        error = RecipeError if model_key else DataError
        raise error(f"{key} '{value}' does not exist{where}; {fix}")


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that holds the same key twice.

    Plain YAML loaders keep the last value of a repeated key without a word, so a recipe with two
    `learning_rate:` lines trains with whichever comes last. Merge keys (`<<: *defaults`) still override
    as YAML defines; only keys written out twice are refused.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if not isinstance(key, Hashable):
                    continue  # SafeLoader refuses it with its own message
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping key written twice (raised by `StrictLoader`)."""

    def __init__(self, key, first: int, second: int):
        super().__init__(f"key '{key}' appears twice")
        self.key, self.lines = key, (first, second)


def load_yaml(text: str):
    """YAML text as `StrictLoader` reads it: safe types only, no repeated keys."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def read_yaml(path: Path) -> dict:
    """The recipe file as a mapping, or a RecipeError saying why not."""
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; pass a YAML file such as recipes/tiny-cpu.yaml")
    try:
        data = load_yaml(path.read_text())
    except DuplicateKeyError as exc:
        first, second = exc.lines
        raise RecipeError(f"recipe {path}: key '{exc.key}' appears twice (lines {first} and {second}); "
                          "keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise RecipeError(f"recipe {path} is empty; see recipes/tiny-cpu.yaml for the keys a recipe needs")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys to values, got a {type(data).__name__}")
    return data


def apply_override(data: dict, override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is read as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set '{override}' must look like key=value (e.g. --set learning_rate=1e-4)")
    try:
        value = load_yaml(text) if text.strip() else None
    except DuplicateKeyError as exc:
        raise RecipeError(f"--set {key.strip()}: key '{exc.key}' appears twice in '{text}'; keep one") from None
    parts = key.strip().split(".")
    target: Any = data
    for depth, part in enumerate(parts[:-1]):
        target = _child(target, part, ".".join(parts[: depth + 1]), create=True)
    last = parts[-1]
    if isinstance(target, list):
        index = _index(target, last, key)
        target[index] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise RecipeError(f"--set {key}: '{'.'.join(parts[:-1])}' is a {type(target).__name__}, not a mapping or list")


def _child(target: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(target, list):
        return target[_index(target, part, path)]
    if isinstance(target, dict):
        if part not in target or target[part] is None:
            if not create:
                raise RecipeError(f"--set {path}: no such key")
            target[part] = {}
        return target[part]
    raise RecipeError(f"--set {path}: cannot descend into a {type(target).__name__}")


def _index(target: list, part: str, path: str) -> int:
    try:
        index = int(part)
    except ValueError:
        raise RecipeError(f"--set {path}: '{part}' must be a list index (0..{len(target) - 1})") from None
    if not -len(target) <= index < len(target):
        raise RecipeError(f"--set {path}: index {index} is out of range; the list has {len(target)} entries")
    return index


def parse_recipe(data: dict, source: Path | None = None) -> Recipe:
    """Validate a recipe mapping and turn it into a `Recipe`.

    As TRL's `TrlParser` does with a config file, the mapping becomes the defaults of an
    `HfArgumentParser` over the three argument groups, which then parses an empty command line:
    argparse's own `type=` reads text values (YAML 1.1 leaves `3e-5` a string), each group's
    `__post_init__` checks its values. Values that are not text are checked against the same
    parser's types first, since argparse converts only text.
    """
    import argparse

    from transformers import HfArgumentParser

    from .configs import DataArguments, ModelArguments, ProSparseConfig

    where = f"recipe {source}" if source else "recipe"
    parser = HfArgumentParser((ModelArguments, DataArguments, ProSparseConfig), exit_on_error=False)
    actions = {action.dest: action for action in parser._actions if action.option_strings and action.nargs != 0}
    _refuse_unknown_keys(data, actions, where)
    for key in REQUIRED_KEYS:
        if not data.get(key):
            raise RecipeError(f"{where} lacks '{key}'; add it to the YAML or pass --set {key}=...")
    for key, value in data.items():
        if not isinstance(value, str) and not _fits(actions[key], value):
            raise _wrong_type(where, key, value, actions[key])
    _check_world_size(bool(data.get("use_cpu")))
    parser.set_defaults(**data)
    try:
        model, data_args, training = parser.parse_args_into_dataclasses(args=[], look_for_args_file=False)
    except argparse.ArgumentError as exc:  # a text value its key's type cannot read
        option = exc.argument_name.split("/")[0]  # "--max_steps/--max-steps"
        key = next(dest for dest, action in actions.items() if option in action.option_strings)
        raise _wrong_type(where, key, data[key], actions[key]) from None
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    except (ValueError, TypeError) as exc:  # TrainingArguments' own checks
        raise RecipeError(f"{where} is invalid: {str(exc).splitlines()[0]}") from None
    return Recipe(model, data_args, training, source)


def _refuse_unknown_keys(data: dict, actions: dict, where: str) -> None:
    unknown = [key for key in data if key not in actions]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), actions, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise RecipeError(f"{where} has unknown key(s) {', '.join(hints)}; keys are the fields of relufy.configs' "
                      "ModelArguments, DataArguments and ProSparseConfig, which holds every "
                      "transformers.TrainingArguments name (see docs/training.md)")


def _fits(action, value) -> bool:
    """Whether a value that is not text suits the parser's action for its key (None is left to the group)."""
    from transformers.hf_argparser import string_to_bool

    if value is None:
        return True
    if action.nargs in ("+", "*"):
        return isinstance(value, (list, tuple))
    if action.choices:
        return value in action.choices
    if action.type is string_to_bool:
        return isinstance(value, bool)
    if action.type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if action.type is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if action.type is dict:
        return isinstance(value, dict)
    # a text key also takes the mappings and lists TrainingArguments reads either way (deepspeed, report_to, ...)
    return not isinstance(value, (bool, int, float))


def _wrong_type(where: str, key: str, value, action) -> RecipeError:
    from transformers.hf_argparser import string_to_bool

    if action.nargs in ("+", "*"):
        expected = "a list"
    elif action.choices:
        expected = "one of " + ", ".join(map(str, action.choices))
    else:
        expected = {string_to_bool: "true/false", int: "an integer", float: "a number", dict: "a mapping",
                    str: "a string"}.get(action.type, getattr(action.type, "__name__", "another value"))
    return RecipeError(f"{where}: '{key}' must be {expected}, got {value!r} ({type(value).__name__})")


def _check_world_size(use_cpu: bool) -> None:
    """More processes on this node than visible GPUs: say how to launch, before TrainingArguments fails on a
    device index (accelerate's shipped configs, like TRL's, say num_processes: 8)."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if processes <= 1 or use_cpu:
        return
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < visible < processes:
        raise RecipeError(f"accelerate launch started {processes} processes on this machine but {visible} GPU(s) "
                          f"are visible; pass --num_processes {visible} to accelerate launch (the config file's "
                          "num_processes is meant for a node with more GPUs)")


def resolve_model_path(value: str) -> str:
    """Expand `pkg:<package>/<file>` to the file inside that installed package; other values pass through."""
    if not value.startswith(PACKAGE_PREFIX):
        return value
    try:
        return str(package_file(value))
    except SourceError as exc:
        raise RecipeError(f"model_name_or_path {exc}") from None
