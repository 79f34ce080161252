"""`relufy train`: a recipe end to end (docs/training.md).

The pipeline around `ProSparseTrainer` (relufy.trainer): check the recipe's inputs and output
folder, convert (or dequantize) the base once (relufy.train_base), tokenize and pack the data, load the model (with
LoRA adapters in LoRA mode), train or resume, save the final model so that it is complete or
absent, record the schedule in its config, plot the curves, and run the optional threshold shift
(relufy.threshold). `train(recipe)` is the scripting entry point; it returns a `TrainResult`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .activations import parse_activation
from .atomic import (MARKER, check_not_input, discard, mark_output, move_into, output_lock, temp_sibling,
                     written_by_relufy)
from .checkpoint import Source, load_tokenizer, read_config, update_provenance
from .errors import DataError, TrainingError
from .recipe import Recipe, check_inputs, resolve_model_path
from .report import TRAINING_PLOT, write_training_plot
from .resume import checked_checkpoint, fingerprint_files, recipe_fingerprint
from .threshold import shift_threshold
from .train_base import Base, prepare_base
from .trainer import CHECKPOINT_PREFIX, ProSparseTrainer, disk_full_stops_training, last_checkpoint

logger = logging.getLogger(__name__)



@dataclass
class TrainResult:
    """What a run did; `relufy train` prints it."""

    output_dir: Path
    steps: int  # optimizer steps taken, resumed ones included
    max_steps: int
    activation_sparsity: float | None = None  # x1 zero-ratio at the last logging step
    l1_lambda: float | None = None  # lambda at the last logging step
    threshold_shift: dict | None = None  # the calibration's result, when threshold_shift ran
    stopped_for_time: bool = False  # max_train_minutes ran out: a checkpoint, no final model
    checkpoint: Path | None = None  # the checkpoint --resume continues from, when stopped_for_time


def train(recipe: Recipe, *, resume: bool = False, force: bool = False, callbacks: list | None = None,
          allow_changes: bool = False) -> TrainResult:
    """Run a recipe end to end: build the trainer, train (or resume), save, shift the threshold.

    The process that saves holds output_dir's lock for the whole run: a second run into the same folder
    stops at once instead of both reporting success over one model."""
    training = recipe.training
    with output_lock(training.output_dir, "relufy train") if training.should_save else contextlib.nullcontext():
        trainer, held_out = build_trainer(recipe, resume=resume, force=force, callbacks=callbacks,
                                          allow_changes=allow_changes)
        return run_training(trainer, recipe, held_out, resume=resume)


def build_trainer(recipe: Recipe, *, resume: bool = False, force: bool = False, callbacks: list | None = None,
                  allow_changes: bool = False) -> tuple[ProSparseTrainer, object]:
    """Prepare model, data and the Trainer for a recipe; return the trainer and the held-out blocks.

    With `resume`, the checkpoint is chosen and the recipe compared with it (relufy.resume) before the base
    is converted or loaded; `allow_changes` continues despite changed training keys, logging each."""
    training = recipe.training
    output_dir = Path(training.output_dir)
    check_inputs(recipe)  # a missing model or data file fails here, before the conversion
    _check_output_dir(output_dir, resume, force, recipe)
    if training.use_liger_kernel:
        if importlib.util.find_spec("liger_kernel") is None:
            raise TrainingError("use_liger_kernel: true needs liger-kernel, which is not installed; "
                                "pip install 'relufy[liger]' (CUDA GPUs only) or set use_liger_kernel: false")
        keep_liger_loss_off_under_zero3(training)
    _force_non_reentrant_checkpointing(training)
    if allow_changes and not resume:
        raise TrainingError("--allow-changes only applies with --resume")
    recipe_base = Base.resolve(recipe.model.model_name_or_path)  # the one resolve and config read of the run
    fingerprint = recipe_fingerprint(recipe, recipe_base)
    if resume:  # TrainingArguments' field for scripts: run_training resumes from it
        checkpoint = checked_checkpoint(output_dir, training, fingerprint, allow_changes=allow_changes)
        training.resume_from_checkpoint = str(checkpoint)
    if training.should_save and not (output_dir / MARKER).exists():
        output_dir.mkdir(parents=True, exist_ok=True)
        mark_output(output_dir, "relufy train")

    base = prepare_base(recipe, recipe_base)
    _check_block_size(base, recipe)
    _check_trainable(base, recipe)
    if resume:
        from .lora import check_resume_matches

        check_resume_matches(checkpoint, training, base.model_type)
    tokenizer = load_tokenizer(base.source, trust_remote_code=recipe.model.trust_remote_code)
    train_blocks, held_out = _prepare_data(recipe, tokenizer)
    model = _load_model(base.source, recipe)
    if training.use_peft:
        from .lora import wrap_with_lora

        checkpointing = any(getattr(training, flag, False)
                            for flag in ("activation_checkpointing", "gradient_checkpointing"))
        model = wrap_with_lora(model, training, gradient_checkpointing=checkpointing, seed=training.seed)
    distiller = _build_distiller(recipe, base, model, tokenizer) if training.distill else None
    eval_blocks = held_out if training.eval_strategy != "no" else None
    trainer = ProSparseTrainer(
        model=model, args=training, train_dataset=train_blocks, eval_dataset=eval_blocks,
        data_collator=collate_blocks, processing_class=tokenizer, callbacks=callbacks,
        schedule=training.stages, base_checkpoint=base.source, distiller=distiller,
        checkpoint_files=fingerprint_files(recipe, fingerprint),
    )
    return trainer, held_out


def run_training(trainer: ProSparseTrainer, recipe: Recipe, held_out, *, resume: bool = False) -> TrainResult:
    """Train (or resume), save the final model, plot, and apply the optional threshold shift."""
    output_dir = Path(recipe.training.output_dir)
    checkpoint = None
    if resume:
        checkpoint = recipe.training.resume_from_checkpoint  # chosen and checked by build_trainer
        if checkpoint is None:
            raise TrainingError(f"--resume: {output_dir} holds no {CHECKPOINT_PREFIX}N folder to resume from; "
                                "run without --resume to start")
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.probe.detach()
    if trainer.stopped_for_time:  # a checkpoint, not a finished model: no final save, plot or shift
        return TrainResult(output_dir, trainer.state.global_step, trainer.state.max_steps, stopped_for_time=True,
                           checkpoint=last_checkpoint(output_dir))
    if recipe.training.use_peft:
        _save_final_lora(trainer, recipe, output_dir)
    else:
        _save_final(trainer, output_dir)
    trainer.save_state()  # trainer_state.json with the log_history beside the final model
    history = trainer.state.log_history
    result = TrainResult(output_dir, trainer.state.global_step, trainer.state.max_steps,
                         activation_sparsity=_last_logged(history, "activation_sparsity"),
                         l1_lambda=_last_logged(history, "l1_lambda"))
    if trainer.is_world_process_zero():
        _record_training(output_dir, recipe, trainer.state.global_step)
        write_training_plot(history, output_dir / TRAINING_PLOT)
        if recipe.training.threshold_shift:
            result.threshold_shift = shift_threshold(output_dir, held_out, recipe.training.threshold_search,
                                                     device=trainer.args.device,
                                                     trust_remote_code=recipe.model.trust_remote_code)
    trainer.accelerator.wait_for_everyone()
    return result


def _check_output_dir(output_dir: Path, resume: bool, force: bool, recipe: Recipe) -> None:
    """output_dir receives checkpoints and the final model over the run: it may not be, hold or lie inside an
    input (base model, data, recipe), and an existing one must be relufy's (its marker, or checkpoints).
    A finished or checkpointed run there is continued only with --resume, replaced only with --force."""
    teacher = recipe.training.distill_teacher
    check_not_input(output_dir, [resolve_model_path(recipe.model.model_name_or_path), recipe.data.data,
                                 recipe.data.held_out_data, recipe.source, teacher and resolve_model_path(teacher)])
    existing = last_checkpoint(output_dir) if output_dir.is_dir() else None
    if output_dir.is_dir() and any(output_dir.iterdir()) and not existing and not written_by_relufy(output_dir):
        raise TrainingError(f"{output_dir} holds files relufy did not write; choose another output_dir or remove "
                            "it yourself")
    finished = (output_dir / "config.json").is_file()
    if (existing or finished) and not resume:
        if not force:
            how = "pass --resume to continue that run, --force to start over (its checkpoints are deleted)" \
                if existing else "pass --force to train a new one in its place"
            raise TrainingError(f"{output_dir} already holds {existing.name if existing else 'a trained model'}; "
                                f"{how}, or choose another output_dir")
        if recipe.training.should_save:
            for old in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
                shutil.rmtree(old)


def keep_liger_loss_off_under_zero3(training) -> None:
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


def _check_block_size(base: Base, recipe: Recipe) -> None:
    """block_size within the model's context (as model_config_overrides leave it), before the data and weights load."""
    from .checks import block_fits_context

    config = {**base.config, **recipe.model.model_config_overrides}
    block_fits_context("block_size", recipe.data.block_size, config, base.source)


def _check_trainable(base: Base, recipe: Recipe) -> None:
    """A base that is not ReLU-family is refused when a stage has lambda > 0, since L1 cannot make it sparse; a
    base with per-layer FATReLU thresholds is refused always: the threshold shift, the saved model and its
    remote code each hold one activation, and would drop the per-layer thresholds."""
    from .per_layer import PER_LAYER

    if parse_activation(str(base.activation)) == PER_LAYER:
        raise TrainingError(f"{base.source} has per-layer FATReLU thresholds (relufy convert --layer-thresholds), a "
                            "form for deployment; train the model it was converted from and convert again")
    if recipe.schedule.max_lambda > 0 and parse_activation(str(base.activation)) is None:
        raise TrainingError(f"{base.source} uses '{base.activation}', not a ReLU-family activation, so the L1 "
                            "regularization cannot make it sparse; set 'activation: relu' in the recipe (it converts "
                            f"first) or run 'relufy convert {base.source} OUT' and train OUT")


def _load_model(source: Source, recipe: Recipe, *, quantize: bool = True):
    """The base as the recipe loads it (dtype, config overrides; 4-bit in QLoRA when `quantize`)."""
    from .checkpoint import load_model
    from .lora import quantization_config

    args = recipe.model
    model = load_model(source, dtype=args.model_dtype, trust_remote_code=args.trust_remote_code,
                       config_overrides=args.model_config_overrides,
                       quantization_config=quantization_config(recipe.training) if quantize else None)
    model.config.use_cache = False
    return model


def _build_distiller(recipe: Recipe, base: Base, model, tokenizer):
    """distill: true: the teacher (relufy.distill), loaded and checked before any step runs."""
    from .distill import build_distiller

    return build_distiller(recipe.training, recipe.model, base, model, tokenizer)


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
    tmp = temp_sibling(output_dir / "final-model", shared=True)  # every rank saves into it
    if trainer.args.should_save:
        discard(tmp)  # left by a run that was killed outright
    trainer.accelerator.wait_for_everyone()
    try:
        with disk_full_stops_training(f"the final model to {output_dir}", output_dir):
            trainer.save_model(str(tmp))
            trainer.accelerator.wait_for_everyone()
            if trainer.args.should_save:
                move_into(tmp, output_dir)
    finally:
        if trainer.args.should_save:
            discard(tmp)


def _save_final_lora(trainer: ProSparseTrainer, recipe: Recipe, output_dir: Path) -> None:
    """Keep the adapter in output_dir/adapter, then save base + adapter merged as a plain checkpoint.

    The merge reloads the base unquantized on the main process alone (no DeepSpeed partitioning,
    no 4-bit rounding) and applies the saved adapter, so the merged weights come from exactly the
    files kept in adapter/.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from .lora import merge_adapter, save_adapter, save_merged

    with disk_full_stops_training(f"the adapter or the merged model to {output_dir}", output_dir):
        adapter_dir = save_adapter(trainer, output_dir)
        if trainer.is_world_process_zero():
            unset_hf_deepspeed_config()
            base = _load_model(trainer.base_checkpoint, recipe, quantize=False)
            merged = merge_adapter(base, adapter_dir)
            merged.config.use_cache = True
            save_merged(merged, trainer.processing_class, output_dir)
            del merged
    trainer.accelerator.wait_for_everyone()


def _record_training(output_dir: Path, recipe: Recipe, steps: int) -> None:
    """Add the schedule and step count (and the LoRA settings) to the saved config under `relufy.training`, in
    place of an earlier run's record that a base carried; an earlier run's threshold shift goes with it, as it
    calibrated other weights (this run's own shift, if any, is recorded after this)."""
    training = {
        "recipe": str(recipe.source) if recipe.source else None,
        "stages": recipe.schedule.describe(),
        "steps": steps,
        "l1_normalisation": "sum over FFN layers of the mean over tokens of ||x1||_1",
    }
    if recipe.training.use_peft:
        from .lora import describe

        training["lora"] = describe(recipe.training, read_config(output_dir).get("model_type"))
    if recipe.training.distill:
        from .distill import describe as describe_distillation

        training["distill"] = describe_distillation(recipe.training)
    update_provenance(output_dir, training=training, threshold_shift=None)


def _last_logged(history: list[dict], key: str):
    return next((entry[key] for entry in reversed(history) if key in entry), None)
