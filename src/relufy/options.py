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
from dataclasses import dataclass
from typing import Literal, NewType, get_args

from .activations import ACTIVATIONS, Activation, make_activation, parse_activation
from .checks import (BATCH_LIMIT, DTYPES, CommaList, int_in_range, listed, number_in_range, option, positive_int,
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


@dataclass
class TrainConfig:
    """`relufy train`: how the recipe (the positional RECIPE, whose keys are `configs.py`'s) is taken: keys
    overridden on the command line, and whether an earlier run in its output_dir is continued."""

    overrides: Override = option(
        help="override a recipe key, dotted for nesting: --set max_steps=100 --set stages.1.lambda=0.01",
        default_factory=list, aliases=["--set"], action="append", metavar="KEY=VALUE")
    resume: bool = option(
        False, "continue from the newest complete checkpoint in output_dir; refused if the recipe changed since")
    allow_changes: bool = option(
        False, "with --resume: continue even though training keys of the recipe changed (each is logged)")

    def __post_init__(self) -> None:
        self.overrides = [self.overrides] if isinstance(self.overrides, str) else list(self.overrides)


@dataclass
class ConvertConfig:
    """`relufy convert`: which ReLU-family activation replaces the FFN's, and how the weights are written."""

    activation: str = option(
        "relu", f"{', '.join(ACTIVATIONS)}, or parametrized as fatrelu_<t> / shifted_relu_<b>", aliases=["-a"])
    threshold: float | None = option(
        None, "FATReLU threshold t (x if x >= t else 0): --activation fatrelu --threshold t is fatrelu_<t>")
    shift: float | None = option(
        None, "shifted ReLU offset b (max(x - b, 0)): --activation shifted_relu --shift b is shifted_relu_<b>")
    layer_thresholds: str | None = option(
        None, "with --activation fatrelu: one FATReLU threshold per FFN layer, from a relufy matched JSON (thresholds "
        "on the activation, measured on this model); the per-layer model it measured, as a checkpoint")
    matched_target: float | None = option(
        None, "with --layer-thresholds: which of the JSON's targets (needed when it holds more than one)")
    link: bool = option(False, "hard-link weight files instead of copying (same filesystem)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "weight dtype when dequantizing a GGUF source")

    def __post_init__(self) -> None:
        supported_dtype("--dtype", self.dtype, ("float32", "bfloat16", "float16"))
        self.activation = self.resolved().config_value
        self.threshold = self.shift = None  # folded into the one spelling, `activation`

    def resolved(self) -> Activation:
        """The activation, in its one spelling (`fatrelu_0.1`); --threshold / --shift only build that name, and
        --layer-thresholds makes it the bare `fatrelu` whose thresholds the config lists."""
        from .per_layer import PER_LAYER

        if self.layer_thresholds is not None:
            if self.activation != "fatrelu" or self.threshold is not None or self.shift is not None:
                raise ActivationError("--layer-thresholds writes one FATReLU threshold per layer: pass --activation "
                                      "fatrelu with it, and no --threshold / --shift")
            return PER_LAYER
        if self.matched_target is not None:
            raise ActivationError("--matched-target chooses a target of --layer-thresholds; pass that file too")
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

    data: str = option(help=".txt/.jsonl file, folder of .txt files, or a datasets name")
    split: str = option("train", "dataset split for a datasets name")
    text_column: str = option("text", "the text column of a datasets name or .jsonl")
    max_tokens: int = option(16384, "tokens to run")
    block_size: int = option(512, "tokens per sequence")
    batch_size: int = option(4, "sequences per forward pass")
    threshold: float = option(0.0, "also report the fraction with |x1| <= threshold (any activation)")
    dtype: str = option("auto", f"dtype the model is loaded in ({', '.join(DTYPES)})")
    device: str | None = option(None, DEVICE_HELP)
    trust_remote_code: bool = option(False, "run the checkpoint's own modeling code")

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

    ps: CommaList = option(
        DEFAULT_PS, "PPL-p%% values, comma-separated (default 1,5,10); 'none' skips PPL-p%%", aliases=["--p"])
    heldout: str = option(
        str(DEFAULT_HELDOUT), "held-out text for PPL-p%% (.txt/.jsonl/folder/datasets name; default: "
        "evaluate/tasks/data/heldout.jsonl)")
    heldout_tokens: int = option(2048, "held-out tokens for PPL-p%%")
    block_size: int = option(256, "tokens per held-out block")
    device: str | None = option(None, DEVICE_HELP)
    dtype: str = option("auto", f"dtype the model is loaded in ({', '.join(DTYPES)})")
    trust_remote_code: bool = option(False, "run the checkpoint's own modeling code")
    speed: bool = option(True, "a short dense-vs-sparse decode speed measurement, on CUDA only (--no-speed skips it)")

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

    targets: CommaList = option(
        help="zero-ratio of x1 to reach in every layer, in (0, 1); repeat it or separate by commas (--target 0.869 "
        "--target 0.9)", kw_only=True, aliases=["--target", "-t"], action="append", metavar="ZERO_RATIO")
    batch_size: int = option(8, "sequences per forward pass, and lm-eval's batch size")
    heldout: str = option(
        str(DEFAULT_HELDOUT), "perplexity text (default: evaluate/tasks/data/heldout.jsonl); also the calibration "
        "text, on separate blocks, unless --calibration is given")
    heldout_tokens: int = option(16384, "perplexity tokens")
    calibration: str | None = option(
        None, "text to calibrate the thresholds on (default: the held-out text's blocks after the perplexity ones)")
    calibration_tokens: int = option(4096, "calibration tokens")
    block_size: int = option(512, "tokens per block")
    run_suite: bool = option(True, "run the lm-eval suite at each target (--no-suite: perplexity and zero-ratio only)")
    threshold_on: Literal["activation", "x1"] = option(
        "activation", "what the thresholds compare: the FFN activation's output (FATReLU on a ReLU model, CATS on a "
        "SiLU one; what the sparse kernels skip) or x1, the down projection's input act(gate) * up")
    uniform: bool = option(False, "one threshold for every layer, the model a single FATReLU threshold runs (default: "
                                  "one per layer)")
    device: str | None = option(None, DEVICE_HELP)
    dtype: str = option("auto", f"dtype the model is loaded in ({', '.join(DTYPES)})")
    trust_remote_code: bool = option(False, "run the checkpoint's own modeling code")

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


# torch.compile modes of the decode loop's step. The loop captures the step as a CUDA graph itself, so
# the modes that add Inductor's own graphs ("reduce-overhead", "max-autotune") are left out.
# "max-autotune-no-cudagraphs" times Triton templates against cuBLAS for every matmul shape of the step
# (at one token the attention projections are GEMVs that cuBLAS splits over K, with a reduce kernel
# after each), at the price of minutes of compilation.
CompileMode = Literal["default", "max-autotune-no-cudagraphs"]


@dataclass
class SpeedConfig:
    """`relufy speed` and `measure_speed`. Decode tokens/s counts the `new_tokens` graph replays only."""

    batch_sizes: CommaList = option((1, 4, 16), "comma-separated decode batch sizes")
    prompt_tokens: int = option(128, "random prompt tokens per sequence")
    new_tokens: int = option(256, "decode steps timed per run")
    generate_tokens: int = option(128, "new tokens of the HF generate run (batch 1)")
    generate_repeats: int = option(3, "HF generate runs per arm, dense and sparse alternated")
    union_batch_sizes: CommaList = option(
        (1, 4, 8), "comma-separated batch sizes whose union of active neurons is reported")
    warmup: int = option(3, "eager steps on a side stream before a capture (PyTorch's CUDA-graph rule)")
    ffn_repeats: int = option(50, "timed replays per FFN; the median is reported")
    copy_bytes: int = option(1 << 30, "size of the device-to-device copy that measures bandwidth")
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = option(
        "bfloat16", "dtype the model is loaded in (recorded in the JSON)")
    device: str | None = option(None, DEVICE_HELP)
    seed: int = option(0, "seed of the random prompts")
    compile: bool = option(
        True, "on CUDA, torch.compile the decode step inside the graph, as gpt-fast does (--no-compile captures the "
        "plain eager step)")
    compile_mode: CompileMode = option(
        "default", "torch.compile mode of the decode step: default, or max-autotune-no-cudagraphs (every matmul "
        "shape timed against Triton templates; minutes more compilation)")
    profile_steps: int = option(
        0, "after each batch size's timed runs, profile this many steps of each arm with torch.profiler: the "
        "time and count of every kernel per step, the step's idle time, and the kernels whose time differs most "
        "between dense and sparse (0: off)")

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
        int_in_range("--profile-steps", self.profile_steps, 0, 1 << 24)
        if self.compile_mode not in get_args(CompileMode):
            raise DataError(f"--compile-mode {self.compile_mode!r} is not one of {', '.join(get_args(CompileMode))}")
        for name in ("warmup", "profile_steps"):
            if getattr(self, name) > self.new_tokens:
                raise DataError(f"{name.replace('_', '-')} ({getattr(self, name)}) must not exceed new-tokens "
                                f"({self.new_tokens}): those steps write into the same static cache")
        self.device = resolve_device(self.device)


@dataclass
class CompareConfig:
    """`relufy compare`: how the columns are named."""

    names: CommaList | None = option(
        None, "comma-separated column names (default: each directory's or JSON file's name)")

    def __post_init__(self) -> None:
        if self.names is not None:
            self.names = list(listed("--names", self.names))


@dataclass
class PublishConfig:
    """`relufy publish`: the evaluation the card reports, and the Hub repository."""

    results: str = option(help="results.json written by `relufy evaluate` for this model")
    speed: str | None = option(
        None, "speed.json written by `relufy speed` for this model: the card's decode speed comes from it instead "
        "of the short look `relufy evaluate` takes (batch 1, no torch.compile, the evaluation's dtype)")
    repo_id: str | None = option(None, "Hub repository id (org/name) for the card and --push")
    base_model: str | None = option(None, "hub id of the original model (default: read from the checkpoint)")
    license: str | None = option(None, "license id (default: carried over from the source model)")
    push: bool = option(False, "upload PUBLISH_DIR to --repo-id")
    private: bool = option(False, "create the Hub repository as private")
