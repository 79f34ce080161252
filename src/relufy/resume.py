"""Exact resume: a recipe fingerprint in every checkpoint, and the checks `relufy train --resume` makes first.

`--resume` continues a run only when the result is the run the recipe describes, or refuses:

- Every checkpoint holds `relufy_recipe.json`, the fingerprint of the recipe keys that change what an
  optimizer step computes (`recipe_fingerprint`): the base model's identity (path or hub id, its
  architecture and sizes, a digest of its weight files), the conversion, the data and its packing,
  the optimizer, learning-rate schedule, batch, steps, seed, the L1 stages, the LoRA keys, and
  every key relufy's argument groups add later unless `FREE_KEYS` says why it may change. On
  resume, a differing key is refused in one line naming old -> new values; `--allow-changes`
  continues and logs each one.
- A checkpoint missing part of what the Trainer restores (weights, optimizer, scheduler, trainer
  state, RNG state; `missing_parts`) is skipped in favour of the newest complete one, or the resume
  is refused when none is complete: never a restarted optimizer or a traceback halfway through.

Both run before the base is converted or any weights load, so resuming with another model is
refused by the fingerprint instead of failing on missing keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from transformers import TrainingArguments

from . import __version__
from .checkpoint import PACKAGE_PREFIX, Source, model_identity
from .configs import DataArguments, ModelArguments, ProSparseConfig
from .errors import TrainingError
from .recipe import Recipe
from .train_base import Base
from .trainer import CHECKPOINT_PREFIX, INCOMPLETE

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "relufy_recipe.json"
FORMAT = 1

# relufy's own recipe keys (ModelArguments, DataArguments and what ProSparseConfig adds to the Trainer's) that
# may change on resume, and why. Every other key of those groups is compared, new ones included.
FREE_KEYS = {
    "converted_model_dir": "where the conversion is cached; the base and `activation` identify its content",
    "trust_remote_code": "permission to run the model's own code, not a training value (the base is compared)",
    "data_hint": "only the text of an error message",
    "preprocessing_num_workers": "processes that tokenize; the packed blocks are the same",
    "max_train_minutes": "when this session stops; a resumed job often has a new wall-clock limit",
    "threshold_shift": "runs after the last step; no optimizer step depends on it",
    "threshold_max_ppl_increase": "threshold shift, after training",
    "threshold_max": "threshold shift, after training",
    "threshold_search_steps": "threshold shift, after training",
    "threshold_eval_tokens": "threshold shift, after training",
}
# The Trainer's keys (transformers.TrainingArguments) that change what an optimizer step computes, or which
# batches it sees. Its other keys are free: output, logging, saving and evaluation (evaluation does not change
# the weights), reporting, hub, devices and process-group options, dataloader workers and pinning, gradient
# checkpointing and torch.compile (the same values, computed differently), `deepspeed` (a config path; its
# "auto" values come from the keys below), `num_train_epochs` (a recipe always sets max_steps, which overrides it)
# and `resume_from_checkpoint` (set by --resume).
TRAINER_KEYS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args", "optim_target_modules",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "seed",
    "data_seed", "bf16", "fp16", "tf32", "label_smoothing_factor", "neftune_noise_alpha", "dataloader_drop_last",
    "train_sampling_strategy", "average_tokens_across_devices", "ignore_data_skip", "use_liger_kernel",
    "liger_kernel_config",
)
# Restored from the checkpoint's optimizer state (torch keeps each param group's lr, betas, eps and weight decay;
# the scheduler keeps its base learning rates), so a new value has no effect even with --allow-changes.
OPTIMIZER_STATE_KEYS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
PATH_KEYS = ("model_name_or_path", "data", "held_out_data")  # compared as absolute paths when they are local
BASE_CONFIG_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size")


def compared_keys() -> list[str]:
    """The recipe keys the fingerprint holds, in the order the groups declare them."""
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f.name for group in (ModelArguments, DataArguments, ProSparseConfig) for f in dataclasses.fields(group)
           if f.name not in trainer_fields and f.name not in FREE_KEYS]
    return own + list(TRAINER_KEYS)


def recipe_fingerprint(recipe: Recipe, base: Base) -> dict:
    """{key: JSON value} for every compared recipe key, the identity of the recipe's `base` (resolved once by
    the run) and the process count."""
    values = dataclasses.asdict(recipe.model) | dataclasses.asdict(recipe.data) | recipe.training.to_dict()
    fields = {key: _plain(values[key]) for key in compared_keys() if key in values}
    for key in PATH_KEYS:
        fields[key] = _absolute(fields[key])
    fields |= _base_identity(base)
    fields["world_size"] = recipe.training.world_size  # processes: the batch each step sees
    return fields


def fingerprint_files(recipe: Recipe, fields: dict) -> dict[str, str]:
    """{file name: text} the trainer writes into every checkpoint: `relufy_recipe.json`."""
    payload = {"format": FORMAT, "relufy": __version__, "recipe": str(recipe.source) if recipe.source else None,
               "fields": fields}
    return {FINGERPRINT_FILE: json.dumps(payload, indent=2, sort_keys=True) + "\n"}


def _base_identity(base: Base) -> dict:
    """The base as a reader would tell models apart: a digest of its weight files, and for a model folder its
    architecture and sizes (a GGUF file's metadata takes seconds to parse; its digest identifies it alone)."""
    identity = {"base.weights_sha256": _weights_digest(base.source)}
    if base.source.gguf_file:
        return identity
    config = base.config
    sizes = config if "hidden_size" in config else (config.get("text_config") or {})  # multimodal: the LM's
    return {f"base.{key}": _plain(sizes.get(key, config.get(key))) for key in BASE_CONFIG_KEYS} | identity


def _weights_digest(source: Source) -> str:
    """sha256 of the base's weight files, read by the main process alone and sent to the others: every byte of
    a multi-GB base is read once per run, not once per rank, and every rank compares the same fingerprint."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    digest = [model_identity(source, "")["weights_sha256"] if PartialState().is_main_process else None]
    return broadcast_object_list(digest, from_process=0)[0]


def _plain(value):
    """A value as JSON holds it (tuples as lists, enums as their text), so stored and new values compare."""
    return json.loads(json.dumps(value, default=str))


def _absolute(value):
    if not isinstance(value, str) or value.startswith(PACKAGE_PREFIX):
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


# -- which checkpoint ------------------------------------------------------------------------------
def checked_checkpoint(output_dir: Path, training: ProSparseConfig, fields: dict, *, allow_changes: bool) -> Path:
    """The checkpoint --resume continues from: the newest complete one, its recipe compared with `fields`, and
    steps left to train (the Trainer would take a step past max_steps from a checkpoint at max_steps)."""
    checkpoint = checkpoint_to_resume(output_dir, training)
    check_recipe_unchanged(checkpoint, fields, allow_changes=allow_changes)
    step = int(checkpoint.name[len(CHECKPOINT_PREFIX):])
    if step >= training.max_steps:
        raise TrainingError(f"--resume: {checkpoint.name} is at step {step} and max_steps is {training.max_steps}, "
                            "so nothing is left to train; raise max_steps with --allow-changes to train further, "
                            "or start over with --force")
    return checkpoint


def checkpoint_to_resume(output_dir: Path, training: ProSparseConfig) -> Path:
    """The newest complete `checkpoint-N` of `output_dir`; incomplete newer ones are skipped with a warning."""
    found = sorted(((int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
                    if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()), reverse=True)
    if not found:
        raise TrainingError(f"--resume: {output_dir} holds no {CHECKPOINT_PREFIX}N folder to resume from; "
                            "run without --resume to start")
    skipped = []
    for _, folder in found:
        missing = missing_parts(folder, training)
        if not missing:
            for name, why in skipped:
                logger.warning("--resume: skipping %s: %s; resuming from %s", name, why, folder.name)
            return folder
        skipped.append((folder.name, missing[0]))
    name, why = skipped[0]
    raise TrainingError(f"--resume: no complete checkpoint in {output_dir}: {name} {why}"
                        + (f" (and {len(skipped) - 1} older one(s) are incomplete too)" if len(skipped) > 1 else "")
                        + "; restore the missing files, or start over with --force or a new output_dir")


def missing_parts(folder: Path, training: ProSparseConfig) -> list[str]:
    """What the Trainer restores on resume and `folder` lacks, each as 'has no X: resuming would ...'."""
    if (folder / INCOMPLETE).exists():
        return ["was still being written (INCOMPLETE marker; its save was killed)"]
    deepspeed = getattr(training, "deepspeed_plugin", None)
    written_by_deepspeed = any(folder.glob("global_step*"))
    missing = []
    if deepspeed is not None:
        if not written_by_deepspeed:
            hint = (" (it was saved without DeepSpeed: resume it without accelerate's DeepSpeed config)"
                    if (folder / "optimizer.pt").is_file() else "")
            missing.append(f"has no DeepSpeed global_stepN folder: resuming would restart the optimizer{hint}")
        elif not _deepspeed_states(folder):
            missing.append("has no model and optimizer states in its global_stepN folder: resuming would restart "
                           "the model or the optimizer")
    else:
        if not _has_weights(folder):
            missing.append("has no model weights (model.safetensors or adapter_model.safetensors): resuming would "
                           "have nothing to load")
        if not (folder / "optimizer.pt").is_file():
            hint = (" (its optimizer state is DeepSpeed's global_stepN: resume under the same DeepSpeed launch)"
                    if written_by_deepspeed else "")
            missing.append(f"has no optimizer.pt: resuming would restart the optimizer{hint}")
    if not (folder / "scheduler.pt").is_file() and not _deepspeed_owns_scheduler(deepspeed):
        missing.append("has no scheduler.pt: resuming would restart the learning-rate schedule")
    if not (folder / "trainer_state.json").is_file():
        missing.append("has no trainer_state.json: resuming would not know the step or the data position")
    if not any(folder.glob("rng_state*.pth")):
        missing.append("has no rng_state.pth: resuming would not replay the same random numbers")
    return missing


def _has_weights(folder: Path) -> bool:
    from transformers.utils import (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
                                    SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME,
             WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    return any((folder / name).is_file() for name in names)


def _deepspeed_states(folder: Path) -> bool:
    """DeepSpeed's engine writes global_stepN/ with *model_states.pt and *optim_states.pt files."""
    return any(any(step.glob("*model_states.pt")) and any(step.glob("*optim_states.pt"))
               for step in folder.glob("global_step*") if step.is_dir())


def _deepspeed_owns_scheduler(plugin) -> bool:
    """A DeepSpeed config with its own `scheduler` saves it in global_stepN instead of scheduler.pt."""
    config = getattr(plugin, "deepspeed_config", None) if plugin is not None else None
    return isinstance(config, dict) and "scheduler" in config


# -- has the recipe changed? -----------------------------------------------------------------------
def check_recipe_unchanged(checkpoint: Path, fields: dict, *, allow_changes: bool) -> None:
    """Refuse (or with `allow_changes`, log) every compared key whose value differs from the checkpoint's."""
    try:
        saved = json.loads((checkpoint / FINGERPRINT_FILE).read_text())["fields"]
    except (OSError, ValueError, KeyError, TypeError):
        if allow_changes:
            logger.warning("--allow-changes: %s has no readable %s, so the recipe is not compared", checkpoint.name,
                           FINGERPRINT_FILE)
            return
        raise TrainingError(f"--resume: {checkpoint.name} has no readable {FINGERPRINT_FILE}, so relufy cannot tell "
                            "whether the recipe changed since; pass --allow-changes to resume it anyway") from None
    changes = changed_fields(saved, fields)
    if not changes:
        return
    if allow_changes:
        for key, old, new in changes:
            kept = (" (no effect: the optimizer state restored from the checkpoint keeps the old value)"
                    if key in OPTIMIZER_STATE_KEYS else "")
            logger.warning("--allow-changes: %s changed since %s: %s -> %s%s", key, checkpoint.name, _show(old),
                           _show(new), kept)
        return
    listed = "; ".join(f"{key} {_show(old)} -> {_show(new)}" for key, old, new in changes)
    raise TrainingError(f"--resume: the recipe changed since {checkpoint.name} ({listed}), so the run would not "
                        "continue as it started; restore those values, pass --allow-changes to continue anyway, "
                        "or choose a new output_dir")


def changed_fields(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for each key whose value differs; a key the checkpoint lacks (a newer relufy's key)
    counts only when its value is not its default."""
    defaults = _defaults()
    changes = []
    for key, new in current.items():
        if key in saved:
            old = saved[key]
        elif key in defaults and defaults[key] == new:
            continue
        else:
            old = "(not recorded)"
        if old != new:
            changes.append((key, old, new))
    return changes


def _defaults() -> dict:
    groups = (ModelArguments, DataArguments, ProSparseConfig)
    return {f.name: _plain(f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for group in groups for f in dataclasses.fields(group)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def _show(value, limit: int = 80) -> str:
    """A value for the one-line message: text (paths, names) whole, long lists and mappings cut."""
    if isinstance(value, str):
        return value
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
