"""ProSparse continual training: the HF Trainer plus lambda(step) * L1(x1) (docs/method.md, sections 2-3).

The loss of a micro-batch is

    loss = L_lm + lambda(t) * sum over FFN layers of mean over tokens of ||x1_token||_1

where x1 is the input of each down projection (read by `SparsityProbe`) and t is the 1-based
index of the optimizer step the micro-batch belongs to. Both terms are per-micro-batch means
over the same tokens (packed blocks have no padding), and the Trainer divides their sum by the
gradient-accumulation steps, so lambda * L1 is scaled exactly like the LM loss under gradient
accumulation, DDP and DeepSpeed.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .activations import module_class, parse_activation
from .architectures import architecture_of
from .checkpoint import update_config
from .atomic import TMP_SUFFIX, respect_umask
from .errors import DataError, RecipeError, TrainingError
from .probe import SparsityProbe, ffn_modules
from .recipe import Recipe, check_inputs, resolve_model_path
from .schedule import Schedule

logger = logging.getLogger(__name__)

PLOT_FILE = "training_curves.png"
_NO_BAD_STEP = 2**62  # first-bad-step value while every loss so far was finite
CHECKPOINT_PREFIX = "checkpoint-"
INCOMPLETE = "INCOMPLETE"  # in a checkpoint folder while it is being written
FINAL_TMP = ".final-model" + TMP_SUFFIX  # the final model is written here, then moved into output_dir
# How libraries report a full disk: OSError (ENOSPC/EDQUOT), safetensors' SafetensorError ("os error 28"),
# torch.save's RuntimeError ("file write failed").
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122", "StorageFull",
                   "file write failed")


class ProSparseTrainer(Trainer):
    """A `Trainer` whose training loss adds lambda(step) * L1 of x1 and logs the sparsity it reaches.

    Logged at every logging step (log_history and every `report_to` backend): `l1_lambda` (the
    lambda of the step just taken), `l1_loss` (the unscaled L1 term, mean over the micro-batches
    since the last log), `lm_loss`, `activation_sparsity` (zero-ratio of x1 over the logged step's batches).
    """

    def __init__(self, *args, schedule: Schedule, probe: SparsityProbe, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = schedule
        self.probe = probe
        probe.enabled = False
        # Per-micro-batch means for both terms; training_step divides the sum by the GA steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._window = _LogWindow()
        self._finite: torch.Tensor | None = None  # all micro-batch losses of this step finite
        self._first_bad_step: torch.Tensor | None = None
        self.add_callback(_NonFiniteLossGuard(self))
        self.stopped_for_time = False  # set by _TimeLimit (max_train_minutes)

    def lambda_for_next_step(self) -> float:
        """lambda of the optimizer step being accumulated now (global_step counts finished steps)."""
        return self.schedule.lambda_at(self.state.global_step + 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the plain LM loss, nothing recorded
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        lam = self.lambda_for_next_step()
        self.probe.count_zeros = self._logs_step(self.state.global_step + 1)
        self.probe.enabled = True
        try:
            lm_loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            l1 = self.probe.pop_l1().to(lm_loss.device)
        finally:
            self.probe.enabled = False  # backward's recomputation (checkpointing) must not count again
        loss = lm_loss + lam * l1 if lam > 0 else lm_loss
        self._window.add(lm_loss.detach(), l1.detach())
        return (loss, outputs) if return_outputs else loss

    def _logs_step(self, step: int) -> bool:
        """Whether the Trainer will log at `step` (zeros are only counted on those steps' batches)."""
        if self.args.logging_strategy != "steps":
            return True
        every = int(self.state.logging_steps or self.args.logging_steps or 1)
        return step % max(every, 1) == 0 or (step == 1 and self.args.logging_first_step) or \
            step >= self.state.max_steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss)
        self._finite = finite if self._finite is None else self._finite & finite
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._window.count:
            lm, l1 = self._window.means()
            sparsity = _zero_ratio(self.probe, lm.device)
            if self.accelerator.num_processes > 1:
                lm, l1, sparsity = (self.accelerator.reduce(t, reduction="mean") for t in (lm, l1, sparsity))
            logs["l1_lambda"] = self.schedule.lambda_at(max(self.state.global_step, 1))
            logs["l1_loss"] = round(float(l1), 6)
            logs["lm_loss"] = round(float(lm), 6)
            logs["activation_sparsity"] = round(float(sparsity), 6)
            self._window = _LogWindow()
            self.probe.reset()
        super().log(logs, start_time)

    def record_step_finite(self) -> None:
        """Fold the step just taken into the first step with a NaN/inf loss (on the device, no sync)."""
        if self._finite is None:
            return
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), _NO_BAD_STEP, dtype=torch.long, device=self._finite.device)
        first_unseen = self._first_bad_step == _NO_BAD_STEP
        self._first_bad_step = torch.where(~self._finite & first_unseen, self.state.global_step, self._first_bad_step)
        self._finite = None

    def check_finite_loss(self) -> None:
        """Stop if a step since the last check had a NaN/inf loss: one host sync, made only where the
        Trainer is about to log, save, evaluate or stop, so no checkpoint ever holds that step's update."""
        if self._first_bad_step is None:
            return
        first_bad = self._first_bad_step
        if self.accelerator.num_processes > 1:
            first_bad = self.accelerator.gather(first_bad.reshape(1)).min()
        step = int(first_bad)
        if step == _NO_BAD_STEP:
            return
        last = last_checkpoint(Path(self.args.output_dir))
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise TrainingError(f"the loss became NaN/inf at step {step}; training stopped at step "
                            f"{self.state.global_step} before saving anything after it, {kept}. Lower "
                            "learning_rate or the stage lambdas, then resume with --resume")

    def _save_checkpoint(self, model, trial):
        """A checkpoint is complete or absent: it carries an INCOMPLETE marker until every file is written, a
        failed or interrupted save removes it, and `last_checkpoint` skips one a kill -9 left marked."""
        folder = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        if self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / INCOMPLETE).write_text("relufy is still writing this checkpoint\n")
        try:
            result = super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's shards are written
        except BaseException as exc:
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            if not isinstance(exc, Exception) or not is_disk_full(exc):
                raise
            last = last_checkpoint(Path(self.args.output_dir))
            kept = f"kept the last good checkpoint {last}" if last else "no earlier checkpoint exists"
            raise TrainingError(f"out of disk space while saving {folder.name} ({_first_line(exc)}); removed it and "
                                f"{kept}. Free space (or raise save_total_limit) and resume with --resume") from None
        if self.args.should_save:
            respect_umask(folder)
            (folder / INCOMPLETE).unlink(missing_ok=True)
        return result


@dataclass
class _LogWindow:
    """Sums of the detached LM and L1 terms since the last log (device tensors, no sync per step)."""

    lm: torch.Tensor | float = 0.0
    l1: torch.Tensor | float = 0.0
    count: int = 0

    def add(self, lm: torch.Tensor, l1: torch.Tensor) -> None:
        self.lm, self.l1, self.count = self.lm + lm.float(), self.l1 + l1.float(), self.count + 1

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.as_tensor(self.lm / self.count), torch.as_tensor(self.l1 / self.count)


class _NonFiniteLossGuard(TrainerCallback):
    """Tracks NaN/inf losses every step without a host sync; checks them before any log or save."""

    def __init__(self, trainer: ProSparseTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.record_step_finite()
        # DefaultFlowCallback ran first, so control says whether this step logs, saves or ends
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self.trainer.check_finite_loss()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate:  # epoch strategies
            self.trainer.check_finite_loss()


class _TimeLimit(TrainerCallback):
    """max_train_minutes: save and stop at the first logging step past the limit (all ranks agree there, at a step
    that syncs anyway), so a wall-clock-limited job ends with a checkpoint that --resume continues exactly."""

    def __init__(self, trainer: ProSparseTrainer, minutes: float):
        self.trainer, self.limit_s, self.start = trainer, minutes * 60, time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if not control.should_log or control.should_training_stop:
            return
        elapsed = torch.tensor(time.monotonic() - self.start, device=self.trainer.accelerator.device)
        if self.trainer.accelerator.num_processes > 1:
            elapsed = self.trainer.accelerator.reduce(elapsed, reduction="max")  # every rank stops at the same step
        if float(elapsed) >= self.limit_s:
            control.should_save = control.should_training_stop = True
            self.trainer.stopped_for_time = True


def _zero_ratio(probe: SparsityProbe, device) -> torch.Tensor:
    """Overall zero-ratio of x1 (mean over layers) as a tensor, without a host sync."""
    ratios = [torch.as_tensor(c.zeros, dtype=torch.float32, device=device) / c.elements
              for c in probe.layers if c.elements]
    return torch.stack(ratios).mean() if ratios else torch.tensor(float("nan"), device=device)


def last_checkpoint(output_dir: Path) -> Path | None:
    """The complete `checkpoint-N` folder with the largest N in `output_dir`, or None.

    A folder still marked INCOMPLETE (its save was killed) is skipped with a warning.
    """
    found = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    for _, folder in sorted(found, reverse=True):
        if not (folder / INCOMPLETE).exists():
            return folder
        logger.warning("skipping %s: its save did not finish (delete it to free the space)", folder)
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the disk or the quota is full."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:200]


# -- the pipeline -----------------------------------------------------------------------------------
def train(recipe: Recipe, *, resume: bool = False, force: bool = False, callbacks: list | None = None) -> dict:
    """Run a recipe end to end; return a summary (output_dir, steps, final sparsity, threshold)."""
    trainer, held_out = build_trainer(recipe, resume=resume, force=force, callbacks=callbacks)
    return run_training(trainer, recipe, held_out, resume=resume)


def build_trainer(recipe: Recipe, *, resume: bool = False, force: bool = False,
                  callbacks: list | None = None) -> tuple[ProSparseTrainer, object]:
    """Prepare model, data and the Trainer for a recipe; return the trainer and the held-out blocks."""
    training = recipe.training
    output_dir = Path(training.output_dir)
    check_inputs(recipe)  # a missing model or data file fails here, before the conversion
    _check_output_dir(output_dir, resume, force, training)
    if training.use_liger_kernel:
        if importlib.util.find_spec("liger_kernel") is None:
            raise TrainingError("use_liger_kernel: true needs liger-kernel, which is not installed; "
                                "pip install 'relufy[liger]' (CUDA GPUs only) or set use_liger_kernel: false")
        _keep_liger_loss_off_under_zero3(training)
    _force_non_reentrant_checkpointing(training)

    base = _prepare_base(recipe)
    if resume and (checkpoint := last_checkpoint(output_dir)) is not None:
        from .lora import check_resume_matches

        check_resume_matches(checkpoint, training, _model_type(base))
    tokenizer = _load_tokenizer(base, recipe.model)
    train_blocks, held_out = _prepare_data(recipe, tokenizer)
    model = _load_model(base, recipe)
    if training.use_peft:
        from .lora import wrap_with_lora

        checkpointing = any(getattr(training, flag, False)
                            for flag in ("activation_checkpointing", "gradient_checkpointing"))
        model = wrap_with_lora(model, training, gradient_checkpointing=checkpointing, seed=training.seed)
    probe = SparsityProbe(model, track_l1=True, replay_l1=True).attach()  # finds x1 through peft's wrappers
    eval_blocks = held_out if training.eval_strategy != "no" else None
    trainer = ProSparseTrainer(
        model=model, args=training, train_dataset=train_blocks, eval_dataset=eval_blocks,
        data_collator=collate_blocks, processing_class=tokenizer, callbacks=callbacks,
        schedule=recipe.schedule, probe=probe,
    )
    trainer.base_checkpoint = base  # what LoRA mode merges its adapter into
    if training.max_train_minutes:
        trainer.add_callback(_TimeLimit(trainer, training.max_train_minutes))
    return trainer, held_out


def run_training(trainer: ProSparseTrainer, recipe: Recipe, held_out, *, resume: bool = False) -> dict:
    """Train (or resume), save the final model, plot, and apply the optional threshold shift."""
    output_dir = Path(recipe.training.output_dir)
    checkpoint = None
    if resume:
        checkpoint = last_checkpoint(output_dir)
        if checkpoint is None:
            raise TrainingError(f"--resume: {output_dir} holds no {CHECKPOINT_PREFIX}N folder to resume from; "
                                "run without --resume to start")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer.probe.detach()
    if trainer.stopped_for_time:  # a checkpoint, not a finished model: no final save, plot or shift
        return {"output_dir": str(output_dir), "steps": trainer.state.global_step, "stopped_for_time": True,
                "checkpoint": str(last_checkpoint(output_dir)), "max_steps": trainer.state.max_steps}
    if recipe.training.use_peft:
        _save_final_lora(trainer, recipe, output_dir)
    else:
        _save_final(trainer, output_dir)
    trainer.save_state()  # trainer_state.json with the log_history beside the final model
    summary = {"output_dir": str(output_dir), "steps": trainer.state.global_step,
               "activation_sparsity": _last_logged(trainer.state.log_history, "activation_sparsity"),
               "l1_lambda": _last_logged(trainer.state.log_history, "l1_lambda")}
    if trainer.is_world_process_zero():
        _record_training(output_dir, recipe, trainer.state.global_step)
        write_training_plot(trainer.state.log_history, output_dir / PLOT_FILE)
        if recipe.training.threshold_shift:
            summary["threshold_shift"] = shift_threshold(output_dir, held_out, recipe, trainer.args.device)
    trainer.accelerator.wait_for_everyone()
    return summary


def _check_output_dir(output_dir: Path, resume: bool, force: bool, training) -> None:
    existing = last_checkpoint(output_dir) if output_dir.is_dir() else None
    if existing and not resume:
        if not force:
            raise TrainingError(f"{output_dir} already holds {existing.name}; pass --resume to continue that run, "
                                "--force to start over (its checkpoints are deleted), or choose another output_dir")
        if training.should_save:
            for old in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
                shutil.rmtree(old)


def _keep_liger_loss_off_under_zero3(training) -> None:
    """Liger's fused linear cross-entropy reads lm_head.weight outside the head's forward, where ZeRO-3 keeps
    it partitioned (empty); under ZeRO-3 the loss stays transformers' own, Liger's norm and RoPE stay on."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        training.liger_kernel_config = {**(training.liger_kernel_config or {}), "fused_linear_cross_entropy": False}
        logger.warning("DeepSpeed ZeRO-3: Liger's fused linear cross-entropy is off (it cannot see the partitioned "
                       "lm_head weight); Liger's other kernels stay on")


def _force_non_reentrant_checkpointing(training) -> None:
    """Gradient checkpointing must be non-reentrant so the L1 term keeps its graph through recomputation.

    transformers >= 5.2x names it `activation_checkpointing`; older 5.x `gradient_checkpointing`.
    """
    names = [("activation_checkpointing", "activation_checkpointing_kwargs"),
             ("gradient_checkpointing", "gradient_checkpointing_kwargs")]
    if not any(getattr(training, flag, False) for flag, _ in names):
        return
    for flag, kwargs_name in names:
        if not hasattr(training, kwargs_name):
            continue
        kwargs = dict(getattr(training, kwargs_name) or {})
        if kwargs.get("use_reentrant"):
            logger.warning("%s.use_reentrant=True replaced by False: the L1 term needs non-reentrant "
                           "checkpointing", kwargs_name)
        setattr(training, kwargs_name, {**kwargs, "use_reentrant": False})


def _prepare_base(recipe: Recipe) -> str:
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
        provenance = _provenance(target)
        if not (provenance.get("dequantized") and provenance.get("source") == str(source)):
            if target.exists():
                raise RecipeError(f"converted_model_dir {target} exists but is not a dequantized copy of {source}; "
                                  "remove it or choose another converted_model_dir")
            target.parent.mkdir(parents=True, exist_ok=True)
            logger.info("dequantizing %s into %s (its activation kept)", source, target)
            dequantize_checkpoint(base, target)
    return str(target)


def _provenance(target: Path) -> dict:
    """The `relufy` entry of a checkpoint's config.json ({} when there is none)."""
    try:
        return json.loads((target / "config.json").read_text()).get("relufy", {})
    except (OSError, json.JSONDecodeError):
        return {}


def _is_conversion_of(target: Path, source: str, activation: str) -> bool:
    provenance = _provenance(target)
    return provenance.get("source") == source and provenance.get("activation") == activation


def _load_tokenizer(base: str, args):
    from .checkpoint import load_tokenizer

    return load_tokenizer(base, trust_remote_code=args.trust_remote_code)


def _model_type(base: str) -> str | None:
    from .checkpoint import read_config, resolve_source

    return read_config(resolve_source(base)).get("model_type")


def _load_model(base: str, recipe: Recipe, *, quantize: bool = True):
    """Load the base with relufy's activations registered; refuse a non-ReLU base when lambda > 0.

    With `load_in_4bit` (LoRA mode) and `quantize`, the frozen base is loaded in 4-bit (QLoRA).
    """
    from transformers import AutoModelForCausalLM

    from .activations import register_activations
    from .lora import quantization_kwargs
    from .checkpoint import read_config, resolve_source

    args, schedule = recipe.model, recipe.schedule
    register_activations()
    source = resolve_source(base)
    config = read_config(source)
    value = architecture_of(config).activation_of(config)
    if schedule.max_lambda > 0 and parse_activation(str(value)) is None:
        raise TrainingError(f"{source} uses '{value}', not a ReLU-family activation, so the L1 regularization "
                            "cannot make it sparse; set 'activation: relu' in the recipe (it converts first) or run "
                            f"'relufy convert {base} OUT' and train OUT")
    dtype = "float32" if source.gguf_file and args.model_dtype == "auto" else args.model_dtype
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    cut = "num_hidden_layers" in args.model_config_overrides
    with _quiet_unloaded_layers(cut):
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch_dtype, trust_remote_code=args.trust_remote_code, **source.load_kwargs(),
            **(quantization_kwargs(recipe.training) if quantize else {}), **args.model_config_overrides)
    if cut:
        logger.info("kept the first %s decoder layers of %s (model_config_overrides)",
                    args.model_config_overrides["num_hidden_layers"], source)
    model.config.use_cache = False
    return model


class _UnloadedLayersReport(logging.Filter):
    """Drops transformers' load report when all it lists is UNEXPECTED keys: the checkpoint's layers that
    `model_config_overrides: {num_hidden_layers: N}` leaves out on purpose. A report with missing or
    mismatched keys still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("LOAD REPORT" in text and "UNEXPECTED" in text and "MISSING" not in text
                    and "MISMATCH" not in text)


@contextlib.contextmanager
def _quiet_unloaded_layers(active: bool):
    source = logging.getLogger("transformers.modeling_utils")
    quiet = _UnloadedLayersReport()
    if active:
        source.addFilter(quiet)
    try:
        yield
    finally:
        source.removeFilter(quiet)


def _prepare_data(recipe: Recipe, tokenizer):
    """Documents split with a fixed seed into train / held-out, each packed into fixed-length blocks."""
    from .data import load_text_dataset, pack_blocks, require_tokens

    args, training = recipe.data, recipe.training
    with training.main_process_first(desc="tokenizing and packing"):
        texts = load_text_dataset(args.data, split=args.data_split, text_column=args.text_column)
        if args.held_out_data:
            train_texts = texts
            held_texts = load_text_dataset(args.held_out_data, split=args.data_split, text_column=args.text_column)
        else:
            if len(texts) < 2:
                raise DataError(f"data '{args.data}' holds {len(texts)} document(s); at least 2 are needed to keep "
                                "a held-out split (separate documents with blank lines, or set held_out_data)")
            split = texts.train_test_split(test_size=args.held_out_fraction, seed=args.held_out_seed)
            train_texts, held_texts = split["train"], split["test"]
        train_blocks = pack_blocks(train_texts, tokenizer, args.block_size, num_proc=args.preprocessing_num_workers)
        held_out = pack_blocks(held_texts, tokenizer, args.block_size, num_proc=args.preprocessing_num_workers)
    if args.max_train_blocks is not None and len(train_blocks) > args.max_train_blocks:
        train_blocks = train_blocks.select(range(args.max_train_blocks))
    per_step = training.per_device_train_batch_size * training.world_size
    require_tokens(train_blocks, per_step * args.block_size, f"training data '{args.data}'")
    if len(held_out) == 0 and (training.threshold_shift or training.eval_strategy != "no"):
        raise DataError(f"the held-out text ({args.held_out_data or f'a split of {args.data}'}) is shorter than one "
                        f"block of {args.block_size} tokens; raise held_out_fraction, add text or lower block_size")
    return train_blocks, held_out


def collate_blocks(rows: list[dict]) -> dict:
    """Stack packed blocks; the labels are the inputs (the model shifts them)."""
    input_ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def _save_final(trainer: ProSparseTrainer, output_dir: Path) -> None:
    """Save the final model into output_dir/.final-model.relufy-tmp, then move its files into output_dir
    (config.json last): an error, Ctrl-C or SIGTERM leaves no half-written model.safetensors beside the checkpoints."""
    tmp = output_dir / FINAL_TMP
    if trainer.args.should_save:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed outright
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(tmp))
        trainer.accelerator.wait_for_everyone()
        if trainer.args.should_save:
            respect_umask(tmp)
            for path in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
                os.replace(path, output_dir / path.name)
    except BaseException as exc:
        if not isinstance(exc, Exception) or not is_disk_full(exc):
            raise
        last = last_checkpoint(output_dir)
        raise TrainingError(f"out of disk space while saving the final model to {output_dir} ({_first_line(exc)}); "
                            f"the last good checkpoint is {last}. Free space and resume with --resume") from None
    finally:
        if trainer.args.should_save:
            shutil.rmtree(tmp, ignore_errors=True)


def _save_final_lora(trainer: ProSparseTrainer, recipe: Recipe, output_dir: Path) -> None:
    """Keep the adapter in output_dir/adapter, then save base + adapter merged as a plain checkpoint.

    The merge reloads the base unquantized on the main process alone (no DeepSpeed partitioning,
    no 4-bit rounding) and applies the saved adapter, so the merged weights come from exactly the
    files kept in adapter/.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from .lora import merge_adapter, save_adapter, save_merged

    try:
        adapter_dir = save_adapter(trainer, output_dir)
        if trainer.is_world_process_zero():
            unset_hf_deepspeed_config()
            base = _load_model(trainer.base_checkpoint, recipe, quantize=False)
            merged = merge_adapter(base, adapter_dir)
            merged.config.use_cache = True
            save_merged(merged, trainer.processing_class, output_dir)
            del merged
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise TrainingError(f"out of disk space while saving the adapter or the merged model to {output_dir}; the "
                            f"last good checkpoint is {last_checkpoint(output_dir)}. Free space and resume with "
                            "--resume") from None
    trainer.accelerator.wait_for_everyone()


def _record_training(output_dir: Path, recipe: Recipe, steps: int) -> None:
    """Add the schedule and step count (and the LoRA settings) to the saved config under `relufy.training`."""
    training = {
        "recipe": str(recipe.source) if recipe.source else None,
        "stages": recipe.schedule.describe(),
        "steps": steps,
        "l1_normalisation": "sum over FFN layers of the mean over tokens of ||x1||_1",
    }
    if recipe.training.use_peft:
        from .lora import describe

        training["lora"] = describe(recipe.training, json.loads((output_dir / "config.json").read_text())
                                    .get("model_type"))
    update_config(output_dir, lambda config: config.setdefault("relufy", {}).update(training=training))


def _last_logged(history: list[dict], key: str):
    return next((entry[key] for entry in reversed(history) if key in entry), None)


# -- the plot --------------------------------------------------------------------------------------
def write_training_plot(history: list[dict], path: Path) -> Path | None:
    """PNG of l1_lambda, loss and activation_sparsity against step (nothing if nothing was logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [entry for entry in history if "l1_lambda" in entry]
    if not rows:
        return None
    steps = [entry["step"] for entry in rows]
    panels = [("l1_lambda", "lambda"), ("loss", "loss (LM + lambda * L1)"), ("activation_sparsity", "x1 zero-ratio")]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7, 7))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [entry.get(key, math.nan) for entry in rows], marker="." if len(rows) < 50 else None)
        if key == "loss":
            ax.plot(steps, [entry.get("lm_loss", math.nan) for entry in rows], label="LM loss")
            ax.legend()
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle("ProSparse training")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# -- threshold shifting (docs/method.md, section 3) -------------------------------------------------
def set_threshold(model: nn.Module, threshold: float) -> int:
    """Replace the ReLU/FATReLU of every FFN by FATReLU(threshold) in place; return how many were swapped."""
    fatrelu = module_class("fatrelu")
    swapped = 0
    for ffn in ffn_modules(model):
        for name, child in ffn.named_children():
            if isinstance(child, (nn.ReLU, fatrelu)):
                setattr(ffn, name, fatrelu(threshold))
                swapped += 1
    return swapped


def calibrate_threshold(model: nn.Module, blocks, *, max_ppl_increase: float, threshold_max: float,
                        steps: int, max_tokens: int) -> dict:
    """Largest FATReLU threshold in [0, threshold_max] whose held-out perplexity stays within the bound.

    Perplexity is assumed to grow with the threshold: the search tries `threshold_max`, then
    bisects `steps` times. The result is rounded down to two significant digits and measured.
    """
    from .metrics import measure_sparsity

    def measure(threshold: float) -> dict:
        if threshold > 0 and set_threshold(model, threshold) == 0:
            raise TrainingError("threshold shift needs a ReLU or FATReLU model; this one has neither in its FFNs")
        result = measure_sparsity(model, blocks, max_tokens=max_tokens, progress=False)
        tried.append({"threshold": threshold, "perplexity": result["perplexity"], "sparsity": result["overall"]})
        return result

    tried: list[dict] = []
    before = measure(0.0)
    bound = before["perplexity"] * (1 + max_ppl_increase)
    if measure(threshold_max)["perplexity"] <= bound:
        best = threshold_max
    else:
        low, high = 0.0, threshold_max
        for _ in range(steps):
            middle = (low + high) / 2
            low, high = (middle, high) if measure(middle)["perplexity"] <= bound else (low, middle)
        best = _round_down(low)
    after = measure(best) if best > 0 else before
    if best > 0 and after["perplexity"] > bound:  # rounding cannot raise it, but measure to be sure
        best, after = 0.0, before
    return {"threshold": best, "max_ppl_increase": max_ppl_increase,
            "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
            "sparsity_before": before["overall"], "sparsity_after": after["overall"],
            "held_out_tokens": after["tokens"], "tried": tried}


def _round_down(value: float, digits: int = 2) -> float:
    if value <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.floor(value * scale) / scale


def shift_threshold(output_dir: Path, held_out, recipe: Recipe, device) -> dict:
    """Calibrate the threshold on the saved model and record it (activation + `relufy.threshold_shift`)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from .activations import Activation, register_activations
    from .portable import write_remote_code

    args = recipe.training
    unset_hf_deepspeed_config()  # reload on this process alone, never partitioned
    register_activations()  # the saved model may already be a fatrelu one
    model = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32,
                                                 trust_remote_code=recipe.model.trust_remote_code).to(device)
    arch = architecture_of(model.config)
    current = parse_activation(str(arch.activation_of(model.config)))
    if current is None or current.name not in ("relu", "fatrelu"):
        raise TrainingError(f"threshold_shift needs a relu or fatrelu model, this one uses "
                            f"'{arch.activation_of(model.config)}'; set threshold_shift: false")
    result = calibrate_threshold(model, held_out, max_ppl_increase=args.threshold_max_ppl_increase,
                                 threshold_max=args.threshold_max, steps=args.threshold_search_steps,
                                 max_tokens=args.threshold_eval_tokens)
    activation = Activation("fatrelu", result["threshold"]) if result["threshold"] > 0 else current

    def record(config: dict) -> None:
        arch.with_activation(config, activation.config_value)
        provenance = config.setdefault("relufy", {})
        provenance["threshold_shift"] = result
        provenance["activation"] = activation.config_value  # provenance names the activation in use

    update_config(output_dir, record)
    write_remote_code(output_dir)
    del model
    return result
