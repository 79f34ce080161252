"""Training recipes: a flat YAML of `transformers.TrainingArguments` keys plus relufy's own keys.

The recipe's keys are the fields of two dataclasses, parsed by `HfArgumentParser`:
`ProSparseArguments` (model, data, `stages:`, threshold shift) and the Trainer's own
`TrainingArguments` (learning_rate, max_steps, logging_steps, output_dir, report_to, ...).
Any key can be overridden with `--set dotted.key=value` (`--set stages.2.lambda=0.1`); values
are read as YAML. Every problem is a `RecipeError` that names the key and the fix.

Relative input paths written in a recipe file (`model_name_or_path`, `data`, `held_out_data`) resolve
against the recipe file's folder, so a recipe and its data can travel together and the recipe works
from any directory; paths given with `--set` and every output path (`output_dir`,
`converted_model_dir`) resolve against the current directory, like any command-line path.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .activations import ACTIVATIONS, parse_activation
from .checkpoint import PACKAGE_PREFIX, package_file
from .errors import DataError, RecipeError, SourceError
from .schedule import Schedule

INPUT_PATH_KEYS = ("model_name_or_path", "data", "held_out_data")
# A value with one of these suffixes (or starting with ./ ../ / ~) names a local file, never a hub name.
FILE_SUFFIXES = (".txt", ".md", ".text", ".json", ".jsonl", ".gz", ".gguf", ".safetensors")
# Liger Kernel options that swap a model's whole MLP for a fused kernel with a hard-coded activation
# (SiLU, GELU, ReLU^2): they would silently undo the conversion, so relufy keeps them off.
LIGER_MLP_KERNELS = ("swiglu", "geglu", "relu_squared")


@dataclass
class ProSparseArguments:
    """relufy's part of a recipe: what the Trainer does not know about."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "base checkpoint: directory, .gguf file, hub id, or pkg:<python package>/<file> for a file shipped "
                "in an installed package"})
    activation: str | None = field(default=None, metadata={
        "help": "convert the base to this activation first (relu, relu2, fatrelu_<t>, shifted_relu_<b>); "
                "leave empty when the base is already converted"})
    converted_model_dir: str | None = field(default=None, metadata={
        "help": "where the conversion is written (default: <output_dir>/base-<activation>); reused when present"})
    model_config_overrides: dict = field(default_factory=dict, metadata={
        "help": "config values applied when loading the base, e.g. {num_hidden_layers: 2} keeps the first layers"})
    model_dtype: str = field(default="float32", metadata={
        "help": "dtype the weights are loaded in (float32 keeps fp32 master weights; use bf16: true for mixed precision)"})
    trust_remote_code: bool = False
    data: str | None = field(default=None, metadata={"help": ".txt/.jsonl file, folder of .txt files, or datasets name"})
    data_hint: str | None = field(default=None, metadata={
        "help": "how to get `data` / `held_out_data` when they are missing (e.g. the command that builds them); "
                "shown in the error"})
    data_split: str = "train"
    text_column: str = "text"
    block_size: int = field(default=1024, metadata={"help": "tokens per packed training sequence"})
    held_out_fraction: float = field(default=0.05, metadata={
        "help": "fraction of documents kept out of training (split with held_out_seed before packing)"})
    held_out_seed: int = 1234
    held_out_data: str | None = field(default=None, metadata={
        "help": "separate held-out text (file, folder or datasets name); when set, `data` is not split"})
    max_train_blocks: int | None = field(default=None, metadata={"help": "use at most this many training blocks"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for datasets.map"})
    max_train_minutes: float | None = field(default=None, metadata={
        "help": "stop cleanly after this many minutes of training (checkpoint at the next logging step, no final "
                "model); continue with --resume. For jobs with a wall-clock limit"})
    stages: list[dict] = field(default_factory=list, metadata={
        "help": "the L1 schedule: a list of {lambda, end_step} (cumulative optimizer steps)"})
    threshold_shift: bool = field(default=False, metadata={
        "help": "after training, switch to FATReLU with the largest threshold whose held-out perplexity increase "
                "stays under threshold_max_ppl_increase"})
    threshold_max_ppl_increase: float = field(default=0.01, metadata={
        "help": "relative perplexity increase allowed by the threshold shift (0.01 = 1%)"})
    threshold_max: float = field(default=0.05, metadata={"help": "largest threshold the search tries"})
    threshold_search_steps: int = field(default=6, metadata={"help": "bisection steps of the threshold search"})
    threshold_eval_tokens: int = field(default=8192, metadata={"help": "held-out tokens per perplexity measurement"})
    # -- parameter-efficient mode (peft LoRA); see docs/training.md "LoRA mode" ------------------
    use_peft: bool = field(default=False, metadata={
        "help": "train LoRA adapters (peft) instead of all weights; merged into the base at the end"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (the update is alpha/r * B A)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch's input"})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "module names (last name component) that get adapters, or ['all-linear']; default: the FFN "
                "projections of the architecture (gate, up, down)"})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "modules trained in full next to the adapters (e.g. [gate_proj] or [input_layernorm, "
                "post_attention_layernorm])"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the frozen base in 4-bit (needs bitsandbytes and a CUDA GPU; use_peft only)"})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4"})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "double quantization of the 4-bit scales"})


@dataclass
class Recipe:
    """A validated recipe: relufy's arguments, the Trainer's arguments and the L1 schedule."""

    prosparse: ProSparseArguments
    training: Any  # transformers.TrainingArguments
    schedule: Schedule
    source: Path | None = None
    recipe_relative: dict = field(default_factory=dict)  # input key -> the relative path written in the file


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
    args = recipe.prosparse
    for key in INPUT_PATH_KEYS:
        value = getattr(args, key)
        if not value or value.startswith(PACKAGE_PREFIX) or not looks_local(value):
            continue
        if Path(value).expanduser().exists():
            continue
        where = "" if os.path.isabs(value) else f" (relative to the current directory {Path.cwd()})"
        if key in recipe.recipe_relative:
            where = (f" (the recipe says '{recipe.recipe_relative[key]}'; relative paths in a recipe resolve against "
                     f"its folder {recipe.source.parent.resolve()})")
        fix = args.data_hint if key != "model_name_or_path" and args.data_hint else f"fix it or pass --set {key}=PATH"
        error = RecipeError if key == "model_name_or_path" else DataError
        raise error(f"{key} '{value}' does not exist{where}; {fix}")


def read_yaml(path: Path) -> dict:
    """The recipe file as a mapping, or a RecipeError saying why not."""
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; pass a YAML file such as recipes/tiny-cpu.yaml")
    try:
        data = yaml.safe_load(path.read_text())
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
    value = yaml.safe_load(text) if text.strip() else None
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
    """Validate a recipe mapping and turn it into a `Recipe`."""
    from transformers import HfArgumentParser, TrainingArguments

    where = f"recipe {source}" if source else "recipe"
    known = _field_hints(ProSparseArguments) | _field_hints(TrainingArguments)
    unknown = [key for key in data if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise RecipeError(f"{where} has unknown key(s) {', '.join(hints)}; keys are ProSparseArguments fields or "
                          "transformers.TrainingArguments names (see docs/training.md)")
    data = {key: _check_type(key, value, known[key], where) for key, value in data.items()}
    for key in ("model_name_or_path", "data", "output_dir"):
        if not data.get(key):
            raise RecipeError(f"{where} lacks '{key}'; add it to the YAML or pass --set {key}=...")
    schedule = Schedule.from_config(data.get("stages"))
    _check_world_size(bool(data.get("use_cpu")))
    try:
        prosparse, training = HfArgumentParser((ProSparseArguments, TrainingArguments)).parse_dict(data)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{where} is invalid: {str(exc).splitlines()[0]}") from None
    _validate(prosparse, training, schedule, where)
    return Recipe(prosparse, training, schedule, source)


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


def _validate(args: ProSparseArguments, training, schedule: Schedule, where: str) -> None:
    if training.max_steps is None or training.max_steps <= 0:
        raise RecipeError(f"{where}: max_steps must be > 0 (stages count optimizer steps); got {training.max_steps}")
    if schedule.stages and schedule.last_step < training.max_steps:
        raise RecipeError(f"{where}: the stages end at step {schedule.last_step} but max_steps is "
                          f"{training.max_steps}; extend the last stage's end_step to {training.max_steps} "
                          "or lower max_steps")
    if args.activation is not None and parse_activation(args.activation) is None:
        raise RecipeError(f"{where}: unknown activation '{args.activation}'. Supported: {', '.join(ACTIVATIONS)} "
                          "(parametrized as fatrelu_<t> / shifted_relu_<b>)")
    if args.block_size < 2:
        raise RecipeError(f"{where}: block_size must be >= 2, got {args.block_size}")
    if not 0 < args.held_out_fraction < 1:
        raise RecipeError(f"{where}: held_out_fraction must be between 0 and 1 (exclusive), got {args.held_out_fraction}")
    if args.max_train_minutes is not None and not args.max_train_minutes > 0:
        raise RecipeError(f"{where}: max_train_minutes must be > 0 or empty, got {args.max_train_minutes}")
    if args.max_train_blocks is not None and args.max_train_blocks < 1:
        raise RecipeError(f"{where}: max_train_blocks must be >= 1 or empty, got {args.max_train_blocks}")
    if args.threshold_max_ppl_increase < 0 or not math.isfinite(args.threshold_max_ppl_increase):
        raise RecipeError(f"{where}: threshold_max_ppl_increase must be >= 0, got {args.threshold_max_ppl_increase}")
    if args.threshold_max <= 0 or not math.isfinite(args.threshold_max):
        raise RecipeError(f"{where}: threshold_max must be > 0, got {args.threshold_max}")
    if args.threshold_search_steps < 1 or args.threshold_eval_tokens < 1:
        raise RecipeError(f"{where}: threshold_search_steps and threshold_eval_tokens must be >= 1")
    if training.per_device_train_batch_size < 1 or training.gradient_accumulation_steps < 1:
        raise RecipeError(f"{where}: per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
    if training.learning_rate < 0:
        raise RecipeError(f"{where}: learning_rate must be >= 0, got {training.learning_rate}")
    _validate_peft(args, where)
    _keep_liger_off_the_mlp(training, where)


def _keep_liger_off_the_mlp(training, where: str) -> None:
    """With use_liger_kernel, take Liger's RMSNorm, RoPE and fused cross-entropy but never its MLP kernels."""
    if not training.use_liger_kernel:
        return
    config = dict(training.liger_kernel_config or {})
    asked = [key for key in LIGER_MLP_KERNELS if config.get(key)]
    if asked:
        raise RecipeError(f"{where}: liger_kernel_config.{asked[0]} would replace the converted FFN by Liger's fused "
                          "kernel with its own fixed activation; remove it (relufy turns the MLP kernels off)")
    training.liger_kernel_config = config | dict.fromkeys(LIGER_MLP_KERNELS, False)


def _validate_peft(args: ProSparseArguments, where: str) -> None:
    """The LoRA keys (module names are checked against the model when it is loaded)."""
    if not args.use_peft:
        if args.load_in_4bit:
            raise RecipeError(f"{where}: load_in_4bit needs use_peft: true (a 4-bit base can only train adapters)")
        return
    if args.lora_r <= 0:
        raise RecipeError(f"{where}: lora_r must be a positive rank (e.g. 16), got {args.lora_r}")
    if args.lora_alpha <= 0:
        raise RecipeError(f"{where}: lora_alpha must be > 0 (e.g. 2 * lora_r), got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise RecipeError(f"{where}: lora_dropout must be in [0, 1), got {args.lora_dropout}")
    for key in ("lora_target_modules", "lora_modules_to_save"):
        names = getattr(args, key)
        if names is not None and (not names or not all(isinstance(n, str) and n for n in names)):
            raise RecipeError(f"{where}: {key} must be a non-empty list of module names, got {names!r}")
    if args.load_in_4bit:
        if args.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise RecipeError(f"{where}: bnb_4bit_quant_type must be nf4 or fp4, got '{args.bnb_4bit_quant_type}'")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RecipeError(f"{where}: load_in_4bit needs bitsandbytes, which is not installed; "
                              "pip install bitsandbytes (CUDA GPU only) or set load_in_4bit: false")


def resolve_model_path(value: str) -> str:
    """Expand `pkg:<package>/<file>` to the file inside that installed package; other values pass through."""
    if not value.startswith(PACKAGE_PREFIX):
        return value
    try:
        return str(package_file(value))
    except SourceError as exc:
        raise RecipeError(f"model_name_or_path {exc}") from None


# -- types ----------------------------------------------------------------------------------------
def _field_hints(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _check_type(key: str, value: Any, hint: Any, where: str) -> Any:
    """Return `value` (a YAML 1.1 exponent float like '3e-5' becomes a float) or raise a RecipeError."""
    if value is None or hint is Any:
        return value
    if isinstance(value, str) and _allows(hint, float) and not _allows(hint, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, int) and not isinstance(value, bool) and _allows(hint, float) and not _allows(hint, int):
        value = float(value)
    if not _conforms(value, hint):
        raise RecipeError(f"{where}: '{key}' must be {_describe(hint)}, got {value!r} ({type(value).__name__})")
    return value


def _options(hint: Any) -> tuple:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return tuple(arg for option in typing.get_args(hint) for arg in _options(option))
    return (hint,)


def _allows(hint: Any, kind: type) -> bool:
    return any(option is kind for option in _options(hint))


def _conforms(value: Any, hint: Any) -> bool:
    for option in _options(hint):
        origin = typing.get_origin(option) or option
        if option is Any or option is type(None) and value is None:
            return True
        if option is bool:
            if isinstance(value, bool):
                return True
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif origin is typing.Literal:
            if value in typing.get_args(option):
                return True
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            if isinstance(value, origin) or value in {member.value for member in origin}:
                return True
        elif origin in (list, tuple):
            if isinstance(value, (list, tuple)):
                return True
        elif isinstance(origin, type):
            if isinstance(value, origin):
                return True
    return False


def _describe(hint: Any) -> str:
    names = []
    for option in _options(hint):
        origin = typing.get_origin(option) or option
        if option is type(None):
            continue
        if isinstance(origin, type) and issubclass(origin, enum.Enum):
            names.append("one of " + ", ".join(str(m.value) for m in origin))
        elif origin is typing.Literal:
            names.append("one of " + ", ".join(map(repr, typing.get_args(option))))
        else:
            names.append({list: "a list", tuple: "a list", dict: "a mapping", bool: "true/false", int: "an integer",
                          float: "a number", str: "a string"}.get(origin, getattr(origin, "__name__", str(origin))))
    return " or ".join(dict.fromkeys(names))
