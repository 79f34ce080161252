"""The argument groups of a recipe: `ModelArguments`, `DataArguments` and `ProSparseConfig`.

A recipe is one flat YAML whose keys are the fields of these three dataclasses (the layout of
alignment-handbook's configs and TRL's `ModelConfig` + `SFTConfig`). `ProSparseConfig` is a
`transformers.TrainingArguments`, so every Trainer key is a recipe key, next to relufy's
schedule, time limit, threshold shift and LoRA keys. Each group checks its own values in
`__post_init__` and raises a `RecipeError` naming the key and the fix; `relufy.recipe` adds the
recipe's name in front.

Importing this module imports transformers (and torch); `relufy.recipe` imports it only when a
recipe is parsed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

from transformers import TrainingArguments

from . import checks
from .activations import ACTIVATIONS, parse_activation
from .checks import option
from .errors import RecipeError, RelufyError
from .schedule import Schedule
from .threshold import ThresholdSearch

# Liger Kernel options that swap a model's whole MLP for a fused kernel with a hard-coded activation
# (SiLU, GELU, ReLU^2): they would silently undo the conversion, so relufy keeps them off.
LIGER_MLP_KERNELS = ("swiglu", "geglu", "relu_squared")


@contextlib.contextmanager
def _as_recipe_error():
    """relufy.checks' one-line errors, as the recipe's: `relufy.recipe` puts the recipe's name in front."""
    try:
        yield
    except RelufyError as exc:
        raise RecipeError(str(exc)) from None


@dataclass
class ModelArguments:
    """Which checkpoint training starts from, and how it is converted and loaded."""

    model_name_or_path: str | None = option(
        None, "base checkpoint: directory, .gguf file, hub id, or pkg:<python package>/<file> for a file shipped "
        "in an installed package")
    activation: str | None = option(
        None, "convert the base to this activation first (relu, relu2, fatrelu_<t>, shifted_relu_<b>); leave empty "
        "when the base is already converted")
    converted_model_dir: str | None = option(
        None, "where the conversion is written (default: <output_dir>/base-<activation>); reused when present")
    model_config_overrides: dict = option(
        help="config values applied when loading the base, e.g. {num_hidden_layers: 2} keeps the first layers",
        default_factory=dict)
    model_dtype: str = option(
        "float32", "dtype the weights are loaded in (float32 keeps fp32 master weights; use bf16: true for mixed "
        "precision)")
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.activation is not None and parse_activation(self.activation) is None:
            raise RecipeError(f"unknown activation '{self.activation}'. Supported: {', '.join(ACTIVATIONS)} "
                              "(parametrized as fatrelu_<t> / shifted_relu_<b>)")
        activation = parse_activation(self.activation or "")
        if activation is not None and activation.name == "fatrelu" and activation.param is None:
            raise RecipeError("activation 'fatrelu' needs its threshold in the name: fatrelu_<t> (e.g. fatrelu_0.01); "
                              "per-layer thresholds come from relufy convert --layer-thresholds")
        if activation is not None and activation.param is not None and not 0 <= activation.param < math.inf:
            raise RecipeError(f"activation '{self.activation}': its parameter must be a finite number >= 0")
        with _as_recipe_error():
            checks.supported_dtype("model_dtype", self.model_dtype)
            checks.finite_config(self.model_config_overrides, "model_config_overrides")


@dataclass
class DataArguments:
    """The training text, its held-out part, and how both are packed into blocks."""

    data: str | None = option(None, ".txt/.jsonl file, folder of .txt files, or datasets name")
    data_hint: str | None = option(
        None, "how to get `data` / `held_out_data` when they are missing (e.g. the command that builds them); "
        "shown in the error")
    data_split: str = "train"
    text_column: str = "text"
    block_size: int = option(1024, "tokens per packed training sequence")
    held_out_fraction: float = option(
        0.05, "fraction of documents kept out of training (split with held_out_seed before packing)")
    held_out_seed: int = 1234
    held_out_data: str | None = option(
        None, "separate held-out text (file, folder or datasets name); when set, `data` is not split")
    max_train_blocks: int | None = option(None, "use at most this many training blocks")
    preprocessing_num_workers: int | None = option(None, "processes for datasets.map")

    def __post_init__(self):
        with _as_recipe_error():
            checks.int_in_range("block_size", self.block_size, 2, 1 << 24)
            checks.number_in_range("held_out_fraction", self.held_out_fraction, 0, 1, low_open=True, high_open=True)
            if self.max_train_blocks is not None:
                checks.positive_int("max_train_blocks (or empty)", self.max_train_blocks)
            if self.preprocessing_num_workers is not None:
                checks.positive_int("preprocessing_num_workers (or empty)", self.preprocessing_num_workers, 1024)


@dataclass
class ProSparseConfig(TrainingArguments):
    """The Trainer's arguments plus what relufy's training adds: the L1 schedule, a wall-clock limit, the
    threshold shift after training, and LoRA mode."""

    stages: list[dict] = option(
        help="the L1 schedule: a list of {lambda, end_step} (cumulative optimizer steps); a relufy.schedule.Schedule "
        "once the config is built", default_factory=list)
    max_train_minutes: float | None = option(
        None, "stop cleanly after this many minutes of training (checkpoint at the next logging step, no final "
        "model); continue with --resume. For jobs with a wall-clock limit")
    threshold_shift: bool = option(
        False, "after training, switch to FATReLU with the largest threshold whose held-out perplexity increase "
        "stays under threshold_max_ppl_increase")
    threshold_max_ppl_increase: float = option(
        ThresholdSearch.max_ppl_increase, "relative perplexity increase allowed by the threshold shift (0.01 = 1%)")
    threshold_max: float = option(ThresholdSearch.threshold_max, "largest threshold the search tries")
    threshold_search_steps: int = option(ThresholdSearch.steps, "bisection steps of the threshold search")
    threshold_eval_tokens: int = option(ThresholdSearch.max_tokens, "held-out tokens per perplexity measurement")
    # -- parameter-efficient mode (peft LoRA); see docs/training.md "LoRA mode" ------------------
    use_peft: bool = option(False, "train LoRA adapters (peft) instead of all weights; merged into the base at the end")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA scaling numerator (the update is alpha/r * B A)")
    lora_dropout: float = option(0.05, "dropout on the LoRA branch's input")
    lora_target_modules: list[str] | None = option(
        None, "module names (last name component) that get adapters, or ['all-linear']; default: the FFN "
        "projections of the architecture (gate, up, down)")
    lora_modules_to_save: list[str] | None = option(
        None, "modules trained in full next to the adapters (e.g. [gate_proj] or [input_layernorm, "
        "post_attention_layernorm])")
    load_in_4bit: bool = option(
        False, "QLoRA: load the frozen base in 4-bit (needs bitsandbytes and a CUDA GPU; use_peft only)")
    bnb_4bit_quant_type: str = option("nf4", "4-bit data type: nf4 or fp4")
    use_bnb_nested_quant: bool = option(False, "double quantization of the 4-bit scales")
    # -- distillation from the unconverted model; see docs/training.md "Distillation" --------------
    distill: bool = option(
        False, "add a distillation term from a frozen teacher: by default the source model with its original "
        "activation (in LoRA mode the same base, adapters disabled, original activation restored)")
    distill_alpha: float = option(
        0.5, "weight of the distillation term: alpha * T^2 * D(teacher || student) + (1 - alpha) * LM")
    distill_temperature: float = option(1.0, "softmax temperature T of both models (> 0)")
    distill_loss: Literal["kl", "jsd"] = option(
        "kl", "kl: forward KL(teacher || student); jsd: GKD's generalized Jensen-Shannon divergence")
    distill_jsd_beta: float = option(
        0.5, "beta of the generalized JSD (0 = forward KL, 1 = reverse KL), distill_loss: jsd only")
    distill_teacher: str | None = option(
        None, "another teacher checkpoint (same vocabulary and tokenizer); default: the source model")

    def __post_init__(self):
        if not isinstance(self.stages, Schedule):  # built once; dataclasses.replace passes the Schedule on
            self.stages = Schedule.from_config(self.stages)
        super().__post_init__()
        if self.max_steps is None or self.max_steps <= 0:
            raise RecipeError(f"max_steps must be > 0 (stages count optimizer steps); got {self.max_steps}")
        if self.stages.stages and self.stages.last_step < self.max_steps:
            raise RecipeError(f"the stages end at step {self.stages.last_step} but max_steps is {self.max_steps}; "
                              f"extend the last stage's end_step to {self.max_steps} or lower max_steps")
        self._check_numbers()
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise RecipeError(f"output_dir {self.output_dir} is a file, not a folder; choose another output_dir")
        self._check_threshold_search()
        self._check_peft()
        self._check_distill()
        self._keep_liger_off_the_mlp()

    @property
    def threshold_search(self) -> ThresholdSearch:
        """The threshold_* keys as the search after training takes them."""
        return ThresholdSearch(self.threshold_max_ppl_increase, self.threshold_max, self.threshold_search_steps,
                               self.threshold_eval_tokens)

    def to_dict(self) -> dict:
        """The Trainer's JSON view (TensorBoard's args text, trackers): the stages as plain mappings."""
        return super().to_dict() | {"stages": self.stages.describe()}

    def _check_numbers(self) -> None:
        """The training numbers relufy relies on, in range and finite (TrainingArguments checks few of them)."""
        with _as_recipe_error():
            checks.positive_int("max_steps", self.max_steps)
            if self.max_train_minutes is not None:
                checks.number_in_range("max_train_minutes (or empty)", self.max_train_minutes, 0, 1e7, low_open=True)
            checks.positive_int("per_device_train_batch_size", self.per_device_train_batch_size, checks.BATCH_LIMIT)
            checks.positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1 << 20)
            checks.number_in_range("learning_rate", self.learning_rate, 0, 10)
            checks.number_in_range("weight_decay", self.weight_decay, 0, 10)
            checks.number_in_range("warmup_steps", float(self.warmup_steps or 0), 0, checks.COUNT_LIMIT)
            checks.number_in_range("max_grad_norm", self.max_grad_norm, 0, 1e6)

    def _check_threshold_search(self) -> None:
        if self.threshold_max_ppl_increase < 0 or not math.isfinite(self.threshold_max_ppl_increase):
            raise RecipeError(f"threshold_max_ppl_increase must be >= 0, got {self.threshold_max_ppl_increase}")
        if self.threshold_max <= 0 or not math.isfinite(self.threshold_max):
            raise RecipeError(f"threshold_max must be > 0, got {self.threshold_max}")
        with _as_recipe_error():
            checks.positive_int("threshold_search_steps", self.threshold_search_steps, 64)
            checks.positive_int("threshold_eval_tokens", self.threshold_eval_tokens)

    def _check_peft(self) -> None:
        """The LoRA keys (module names are checked against the model when it is loaded)."""
        if not self.use_peft:
            if self.load_in_4bit:
                raise RecipeError("load_in_4bit needs use_peft: true (a 4-bit base can only train adapters)")
            return
        with _as_recipe_error():
            checks.positive_int("lora_r", self.lora_r, 1 << 16)
            checks.number_in_range("lora_alpha", self.lora_alpha, 0, 1 << 20, low_open=True)
        if not 0 <= self.lora_dropout < 1:
            raise RecipeError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for key in ("lora_target_modules", "lora_modules_to_save"):
            names = getattr(self, key)
            if names is not None and (not isinstance(names, list) or not names
                                      or not all(isinstance(n, str) and n for n in names)):
                raise RecipeError(f"{key} must be a non-empty list of module names, got {names!r}")
        if self.load_in_4bit:
            if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
                raise RecipeError(f"bnb_4bit_quant_type must be nf4 or fp4, got '{self.bnb_4bit_quant_type}'")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise RecipeError("load_in_4bit needs bitsandbytes, which is not installed; "
                                  "pip install bitsandbytes (CUDA GPU only) or set load_in_4bit: false")

    def _check_distill(self) -> None:
        """The distillation keys (the teacher itself is checked when it is loaded)."""
        if not 0 <= self.distill_alpha <= 1:
            raise RecipeError(f"distill_alpha must be in [0, 1] (the teacher's share of the loss), got {self.distill_alpha}")
        if not self.distill_temperature > 0 or not math.isfinite(self.distill_temperature):
            raise RecipeError(f"distill_temperature must be a finite number > 0 (e.g. 1.0), got {self.distill_temperature}")
        if not 0 <= self.distill_jsd_beta <= 1:
            raise RecipeError(f"distill_jsd_beta must be in [0, 1], got {self.distill_jsd_beta}")
        if self.distill_loss not in ("kl", "jsd"):
            raise RecipeError(f"distill_loss must be kl or jsd, got '{self.distill_loss}'")
        if self.distill_teacher is not None and not self.distill:
            raise RecipeError("distill_teacher is set but distill is false; set distill: true or remove distill_teacher")

    def _keep_liger_off_the_mlp(self) -> None:
        """With use_liger_kernel, take Liger's RMSNorm, RoPE and fused cross-entropy but never its MLP kernels."""
        if not self.use_liger_kernel:
            return
        config = dict(self.liger_kernel_config or {})
        asked = [key for key in LIGER_MLP_KERNELS if config.get(key)]
        if asked:
            raise RecipeError(f"liger_kernel_config.{asked[0]} would replace the converted FFN by Liger's fused "
                              "kernel with its own fixed activation; remove it (relufy turns the MLP kernels off)")
        self.liger_kernel_config = config | dict.fromkeys(LIGER_MLP_KERNELS, False)
