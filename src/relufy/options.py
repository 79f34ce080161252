"""The options of every relufy command: one dataclass per command, whose fields are the command's flags
(`train`'s are how its recipe is taken: overrides, resume; the recipe's own keys are `configs.py`'s).

The CLI builds each subcommand's flags from its dataclass with `transformers.HfArgumentParser`, as TRL's
`TrlParser` does: a field `block_size` is the flag `--block-size` (and `--block_size`), its default is
the flag's default, its `help` metadata the flag's help, a `bool` field that defaults to True gets a
`--no-...` flag, and any other metadata (`aliases`, `choices`, `action`) goes to argparse as it is.
Each dataclass checks its own values in `__post_init__` with the shared checks of `relufy.checks`,
so the command line, a `--config` YAML and a Python caller are refused the same way, before anything
loads. List options are text on the command line (`CommaList`) and split there.

What a command reads and writes (MODEL, OUT, `--output`, `--force`) is no option of what it
measures: the CLI adds those arguments itself, as the library functions take them apart from
the config (`evaluate_model(model, output, config, force=...)`).

Importing this module imports no torch (the CLI's `--help` must stay fast); a `device` is resolved,
which asks torch, only when a config is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NewType

from .activations import ACTIVATIONS, Activation, make_activation, parse_activation
from .checks import (BATCH_LIMIT, DTYPES, CommaList, int_in_range, listed, number_in_range, positive_int,
                     resolve_device, supported_dtype)
from .errors import ActivationError, DataError
from .suites import DEFAULT_HELDOUT, SuiteOptions

DEFAULT_PS = (1.0, 5.0, 10.0)  # PPL-p% values: perplexity rises of 1%, 5% and 10%
DEVICE_HELP = "cpu, cuda, cuda:1...; unset (None): cuda when available, else cpu"
BLOCK_LIMIT = 1 << 24


Override = NewType("Override", str)
"""The type of one `--set KEY=VALUE`, kept whole (a value may hold commas: `--set lora_target_modules=[a,b]`).
A field of this type holds the list of them, one per flag (argparse's `append`, as `MatchedConfig.targets`):
`HfArgumentParser` would turn a `list[...]` field into `nargs="+"`, which would swallow a RECIPE after it."""


def _help(text: str, **metadata) -> dict:
    return {"help": text, **metadata}


@dataclass
class TrainConfig:
    """`relufy train`: how the recipe (the positional RECIPE, whose keys are `configs.py`'s) is taken: keys
    overridden on the command line, and whether an earlier run in its output_dir is continued."""

    overrides: Override = field(default_factory=list, metadata=_help(
        "override a recipe key, dotted for nesting: --set max_steps=100 --set stages.1.lambda=0.01",
        aliases=["--set"], action="append", metavar="KEY=VALUE"))
    resume: bool = field(default=False, metadata=_help(
        "continue from the newest complete checkpoint in output_dir; refused if the recipe changed since"))
    allow_changes: bool = field(default=False, metadata=_help(
        "with --resume: continue even though training keys of the recipe changed (each is logged)"))

    def __post_init__(self) -> None:
        self.overrides = [self.overrides] if isinstance(self.overrides, str) else list(self.overrides)


@dataclass
class ConvertConfig:
    """`relufy convert`: which ReLU-family activation replaces the FFN's, and how the weights are written."""

    activation: str = field(default="relu", metadata=_help(
        f"{', '.join(ACTIVATIONS)}, or parametrized as fatrelu_<t> / shifted_relu_<b>",
        aliases=["-a"]))
    threshold: float | None = field(default=None, metadata=_help(
        "FATReLU threshold t (x if x >= t else 0): --activation fatrelu --threshold t is fatrelu_<t>"))
    shift: float | None = field(default=None, metadata=_help(
        "shifted ReLU offset b (max(x - b, 0)): --activation shifted_relu --shift b is shifted_relu_<b>"))
    link: bool = field(default=False, metadata=_help(
        "hard-link weight files instead of copying (same filesystem)"))
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata=_help(
        "weight dtype when dequantizing a GGUF source"))

    def __post_init__(self) -> None:
        supported_dtype("--dtype", self.dtype, ("float32", "bfloat16", "float16"))
        self.activation = self.resolved().config_value
        self.threshold = self.shift = None  # folded into the one spelling, `activation`

    def resolved(self) -> Activation:
        """The activation, in its one spelling (`fatrelu_0.1`); --threshold / --shift only build that name."""
        parsed = parse_activation(self.activation)
        if parsed is None or self.activation in ACTIVATIONS:
            return make_activation(self.activation, threshold=self.threshold, shift=self.shift)
        if self.threshold is not None or self.shift is not None:
            raise ActivationError(f"--activation {self.activation} already names its parameter; drop "
                                  "--threshold / --shift")
        if not 0 <= parsed.param < math.inf:
            raise ActivationError(f"--activation {self.activation}: its parameter must be a finite number >= 0")
        return parsed


@dataclass
class SparsityConfig:
    """`relufy sparsity`: the text, how much of it, and how the model is loaded."""

    data: str = field(metadata=_help(".txt/.jsonl file, folder of .txt files, or a datasets name"))
    split: str = field(default="train", metadata=_help("dataset split for a datasets name"))
    text_column: str = field(default="text", metadata=_help("the text column of a datasets name or .jsonl"))
    max_tokens: int = field(default=16384, metadata=_help("tokens to run"))
    block_size: int = field(default=512, metadata=_help("tokens per sequence"))
    batch_size: int = field(default=4, metadata=_help("sequences per forward pass"))
    threshold: float = field(default=0.0, metadata=_help(
        "also report the fraction with |x1| <= threshold (any activation)"))
    dtype: str = field(default="auto", metadata=_help(f"dtype the model is loaded in ({', '.join(DTYPES)})"))
    device: str | None = field(default=None, metadata=_help(DEVICE_HELP))
    trust_remote_code: bool = field(default=False, metadata=_help("run the checkpoint's own modeling code"))

    def __post_init__(self) -> None:
        number_in_range("--threshold", self.threshold, 0, math.inf, high_open=True)
        positive_int("--max-tokens", self.max_tokens)
        int_in_range("--block-size", self.block_size, 2, BLOCK_LIMIT)
        positive_int("--batch-size", self.batch_size, BATCH_LIMIT)
        supported_dtype("--dtype", self.dtype)
        self.device = resolve_device(self.device)


@dataclass
class EvalConfig(SuiteOptions):
    """`relufy evaluate`: the lm-eval suite (`SuiteOptions`' fields), then PPL-p% sparsity on held-out text,
    on the model loaded with `device`, `dtype` and `trust_remote_code`."""

    ps: CommaList = field(default=DEFAULT_PS, metadata=_help(
        "PPL-p%% values, comma-separated (default 1,5,10); 'none' skips PPL-p%%", aliases=["--p"]))
    heldout: str = field(default=str(DEFAULT_HELDOUT), metadata=_help(
        "held-out text for PPL-p%% (.txt/.jsonl/folder/datasets name; default: evaluate/tasks/data/heldout.jsonl)"))
    heldout_tokens: int = field(default=2048, metadata=_help("held-out tokens for PPL-p%%"))
    block_size: int = field(default=256, metadata=_help("tokens per held-out block"))
    device: str | None = field(default=None, metadata=_help(DEVICE_HELP))
    dtype: str = field(default="auto", metadata=_help(f"dtype the model is loaded in ({', '.join(DTYPES)})"))
    trust_remote_code: bool = field(default=False, metadata=_help("run the checkpoint's own modeling code"))
    speed: bool = field(default=True, metadata=_help(
        "a short dense-vs-sparse decode speed measurement, on CUDA only (--no-speed skips it)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        ps = () if self.ps in ("none", ["none"]) else listed("--p", self.ps, float,
                                                             "comma-separated numbers like 1,5,10")
        self.ps = tuple(number_in_range("--p (a perplexity rise in percent)", p, 0, 1000, low_open=True)
                        for p in ps)
        positive_int("--heldout-tokens", self.heldout_tokens)
        int_in_range("--block-size", self.block_size, 2, BLOCK_LIMIT)
        supported_dtype("--dtype", self.dtype)
        self.device = resolve_device(self.device)
        if self.heldout_tokens < self.block_size:
            raise DataError(f"--heldout-tokens ({self.heldout_tokens}) must be at least --block-size "
                            f"({self.block_size})")


@dataclass
class MatchedConfig(SuiteOptions):
    """`relufy matched`: the target zero-ratios, the texts, and the lm-eval suite (`SuiteOptions`' fields)."""

    targets: CommaList = field(kw_only=True, metadata=_help(
        "zero-ratio of x1 to reach in every layer, in (0, 1); repeat it or separate by commas "
        "(--target 0.869 --target 0.9)", aliases=["--target", "-t"], action="append", metavar="ZERO_RATIO"))
    batch_size: int = field(default=8, metadata=_help("sequences per forward pass, and lm-eval's batch size"))
    heldout: str = field(default=str(DEFAULT_HELDOUT), metadata=_help(
        "perplexity text (default: evaluate/tasks/data/heldout.jsonl); also the calibration text, on separate "
        "blocks, unless --calibration is given"))
    heldout_tokens: int = field(default=16384, metadata=_help("perplexity tokens"))
    calibration: str | None = field(default=None, metadata=_help(
        "text to calibrate the thresholds on (default: the held-out text's blocks after the perplexity ones)"))
    calibration_tokens: int = field(default=4096, metadata=_help("calibration tokens"))
    block_size: int = field(default=512, metadata=_help("tokens per block"))
    run_suite: bool = field(default=True, metadata=_help(
        "run the lm-eval suite at each target (--no-suite: perplexity and zero-ratio only)"))
    device: str | None = field(default=None, metadata=_help(DEVICE_HELP))
    dtype: str = field(default="auto", metadata=_help(f"dtype the model is loaded in ({', '.join(DTYPES)})"))
    trust_remote_code: bool = field(default=False, metadata=_help("run the checkpoint's own modeling code"))

    def __post_init__(self) -> None:
        """Refuse settings that cannot give a meaningful number, before anything is loaded."""
        super().__post_init__()  # --batch-size, --limit, --max-length, --tasks
        self.targets = listed("--target", self.targets, float, "zero-ratios like 0.9 or 0.869,0.9")
        if not self.targets:
            raise DataError("give at least one --target zero-ratio, e.g. --target 0.9")
        for target in self.targets:
            number_in_range("--target (a zero-ratio, e.g. 0.9)", target, 0, 1, low_open=True, high_open=True)
        int_in_range("--block-size", self.block_size, 2, BLOCK_LIMIT)
        for name in ("heldout_tokens", "calibration_tokens"):
            positive_int(f"--{name.replace('_', '-')}", getattr(self, name))
            if getattr(self, name) < self.block_size:
                raise DataError(f"--{name.replace('_', '-')} ({getattr(self, name)}) must be at least --block-size "
                                f"({self.block_size})")
        supported_dtype("--dtype", self.dtype)
        self.device = resolve_device(self.device)

    def check(self) -> None:
        """The same checks again, for a config changed after it was made."""
        self.__post_init__()


@dataclass
class SpeedConfig:
    """`relufy speed` and `measure_speed`. Decode tokens/s counts the `new_tokens` graph replays only."""

    batch_sizes: CommaList = field(default=(1, 4, 16), metadata=_help("comma-separated decode batch sizes"))
    prompt_tokens: int = field(default=128, metadata=_help("random prompt tokens per sequence"))
    new_tokens: int = field(default=256, metadata=_help("decode steps timed per run"))
    generate_tokens: int = field(default=128, metadata=_help("new tokens of the HF generate run (batch 1)"))
    generate_repeats: int = field(default=3, metadata=_help(
        "HF generate runs per arm, dense and sparse alternated"))
    union_batch_sizes: CommaList = field(default=(1, 4, 8), metadata=_help(
        "comma-separated batch sizes whose union of active neurons is reported"))
    warmup: int = field(default=3, metadata=_help(
        "eager steps on a side stream before a capture (PyTorch's CUDA-graph rule)"))
    ffn_repeats: int = field(default=50, metadata=_help("timed replays per FFN; the median is reported"))
    copy_bytes: int = field(default=1 << 30, metadata=_help(
        "size of the device-to-device copy that measures bandwidth"))
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = field(default="bfloat16", metadata=_help(
        "dtype the model is loaded in (recorded in the JSON)"))
    device: str | None = field(default=None, metadata=_help(DEVICE_HELP))
    seed: int = field(default=0, metadata=_help("seed of the random prompts"))
    compile: bool = field(default=True, metadata=_help(
        "on CUDA, torch.compile the decode step inside the graph, as gpt-fast does (--no-compile captures the "
        "plain eager step)"))

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        self.batch_sizes = listed("--batch-sizes", self.batch_sizes, int, "comma-separated integers like 1,4,16")
        self.union_batch_sizes = listed("--union-batch-sizes", self.union_batch_sizes, int,
                                        "comma-separated integers like 1,4,8")
        if not self.batch_sizes:
            raise DataError("--batch-sizes must name at least one batch size, e.g. 1,4,16")
        for size in self.batch_sizes:
            positive_int("--batch-sizes (each)", size, BATCH_LIMIT)
        for name in ("prompt_tokens", "new_tokens", "generate_tokens", "warmup", "ffn_repeats", "copy_bytes"):
            positive_int(f"--{name.replace('_', '-')}", getattr(self, name), 1 << (40 if name == "copy_bytes" else 24))
        supported_dtype("--dtype", self.dtype, DTYPES)
        int_in_range("--seed", self.seed, 0, 2**32 - 1)
        if self.warmup > self.new_tokens:
            raise DataError(f"warmup ({self.warmup}) must not exceed new-tokens ({self.new_tokens}): the warm-up "
                            "steps write into the same static cache")
        self.device = resolve_device(self.device)


@dataclass
class CompareConfig:
    """`relufy compare`: how the columns are named."""

    names: CommaList | None = field(default=None, metadata=_help(
        "comma-separated column names (default: each directory's or JSON file's name)"))

    def __post_init__(self) -> None:
        if self.names is not None:
            self.names = list(listed("--names", self.names))


@dataclass
class PublishConfig:
    """`relufy publish`: the evaluation the card reports, and the Hub repository."""

    results: str = field(metadata=_help("results.json written by `relufy evaluate` for this model"))
    repo_id: str | None = field(default=None, metadata=_help("Hub repository id (org/name) for the card and --push"))
    base_model: str | None = field(default=None, metadata=_help(
        "hub id of the original model (default: read from the checkpoint)"))
    license: str | None = field(default=None, metadata=_help(
        "license id (default: carried over from the source model)"))
    push: bool = field(default=False, metadata=_help("upload PUBLISH_DIR to --repo-id"))
    private: bool = field(default=False, metadata=_help("create the Hub repository as private"))
