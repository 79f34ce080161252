"""LoRA mode (peft): adapters instead of full weights, trained with the same L1 schedule, merged at the end.

The probe keeps working on a wrapped model: peft replaces `mlp.down_proj` by a LoRA layer whose
input is still x1 (the adapter adds B A x1 to the projection's *output*), so `ffn_modules` /
`down_projections` find the same modules by name and see the same tensor, merged or not.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from .architectures import Architecture, architecture_for
from .atomic import discard, move_into, replace_with, temp_sibling
from .errors import RecipeError, TrainingError

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = "all-linear"
# The adapter_config.json fields a resumed run must share with the checkpoint.
COMPARED_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")


def default_target_modules(arch: Architecture) -> list[str]:
    """The FFN projections of an architecture: gate, up and down (or the fused gate_up and down)."""
    return [name for name in (arch.gate, arch.gate_up, arch.up, arch.down) if name]


def lora_config(args, model_type: str | None):
    """The `peft.LoraConfig` a recipe asks for (target modules default to the FFN projections)."""
    from peft import LoraConfig

    saved = list(args.lora_modules_to_save or [])
    if args.lora_target_modules is None:
        targets: list[str] | str = [name for name in default_target_modules(architecture_for(model_type))
                                    if name not in saved]
    elif args.lora_target_modules == [ALL_LINEAR]:
        targets = ALL_LINEAR
    else:
        targets = list(args.lora_target_modules)
        both = sorted(set(targets) & set(saved))
        if both:
            raise RecipeError(f"{', '.join(both)} is in both lora_target_modules and lora_modules_to_save; a module "
                              "either gets an adapter or is trained in full, remove it from one list")
    if not targets:
        raise RecipeError("lora_modules_to_save takes every default LoRA target; set lora_target_modules too")
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, modules_to_save=saved or None, bias="none", task_type="CAUSAL_LM")


def quantization_config(args):
    """The `BitsAndBytesConfig` of QLoRA-style 4-bit loading, or None unless load_in_4bit."""
    if not args.load_in_4bit:
        return None
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("load_in_4bit needs bitsandbytes, which is not installed; pip install bitsandbytes "
                          "(CUDA GPU only) or set load_in_4bit: false")
    if not torch.cuda.is_available():
        raise RecipeError("load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit kernels); set load_in_4bit: false")
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=args.use_bnb_nested_quant, bnb_4bit_compute_dtype=compute)


def wrap_with_lora(model: nn.Module, args, *, gradient_checkpointing: bool = False,
                    seed: int | None = None) -> nn.Module:
    """Freeze `model` and add LoRA adapters (a `peft.PeftModel`); module names are checked first."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    config = lora_config(args, getattr(model.config, "model_type", None))
    if config.target_modules != ALL_LINEAR:
        check_module_names(model, config.target_modules, "lora_target_modules", linear_only=True)
    check_module_names(model, config.modules_to_save or [], "lora_modules_to_save", linear_only=False)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)  # LoRA A is random-initialised: the same recipe gives the same adapters
    if args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def check_module_names(model: nn.Module, names, key: str, *, linear_only: bool) -> None:
    """Every name must be the last component of some module's name; otherwise list the names that exist."""
    existing: set[str] = set()
    for full_name, module in model.named_modules():
        if full_name and (not linear_only or isinstance(module, nn.Linear) or "Linear" in type(module).__name__):
            existing.add(full_name.rsplit(".", 1)[-1])
    missing = [name for name in names if name.rsplit(".", 1)[-1] not in existing]
    if missing:
        kind = "linear modules" if linear_only else "modules"
        shown = sorted(name for name in existing if not name.isdigit())
        raise RecipeError(f"{key}: {', '.join(missing)} match(es) nothing in {type(model).__name__}; its "
                          f"{kind} are named {', '.join(shown)}")


def check_resume_matches(checkpoint: Path, args, model_type: str | None) -> None:
    """Refuse to resume a checkpoint whose adapter (or lack of one) differs from the recipe's."""
    saved_path = checkpoint / ADAPTER_CONFIG
    if not args.use_peft:
        if saved_path.is_file():
            raise TrainingError(f"--resume: {checkpoint} holds LoRA adapters but the recipe trains all weights; "
                                "set use_peft: true with the same lora_* keys, or start over with --force")
        return
    if not saved_path.is_file():
        raise TrainingError(f"--resume: {checkpoint} is a full-training checkpoint (no {ADAPTER_CONFIG}) but the "
                            "recipe sets use_peft: true; resume with use_peft: false, or start over with --force")
    saved = json.loads(saved_path.read_text())
    wanted = lora_config(args, model_type).to_dict()
    fields = [name for name in COMPARED_FIELDS  # all-linear is expanded to the found names when saved
              if not (name == "target_modules" and wanted.get(name) == ALL_LINEAR)]
    differ = [f"{name} {_normal(saved.get(name))} -> {_normal(wanted.get(name))}" for name in fields
              if _normal(saved.get(name)) != _normal(wanted.get(name))]
    if differ:
        raise TrainingError(f"--resume: the recipe's LoRA config differs from {checkpoint.name}'s "
                            f"({'; '.join(differ)}); resume with the checkpoint's lora_* values or start over "
                            "with --force")


def _normal(value):
    if isinstance(value, (list, tuple, set)):
        return sorted(value)
    return value


def save_adapter(trainer, output_dir: Path) -> Path:
    """Save the trained adapter (and tokenizer) to output_dir/adapter, replacing an older one atomically."""
    target = output_dir / ADAPTER_DIR
    tmp = temp_sibling(target, shared=True)  # every rank saves: DeepSpeed gathers the weights collectively
    if trainer.args.should_save:
        discard(tmp)
    try:
        trainer.save_model(str(tmp))
        if trainer.args.should_save:
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing should need to load it
            replace_with(tmp, target)
    finally:
        if trainer.args.should_save:
            discard(tmp)
    return target


def merge_adapter(base_model: nn.Module, adapter_dir: Path) -> nn.Module:
    """The base with the adapter from `adapter_dir` merged into its weights (a plain transformers model)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False).merge_and_unload()


def save_merged(model: nn.Module, tokenizer, output_dir: Path) -> None:
    """save_pretrained into a temporary sibling, then move the files into output_dir."""
    tmp = temp_sibling(output_dir / "merged")
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for stale in output_dir.glob("model*.safetensors*"):
            stale.unlink()
        move_into(tmp, output_dir)
    finally:
        discard(tmp)


def describe(args, model_type: str | None) -> dict:
    """What `relufy.training.lora` records in the merged config."""
    config = lora_config(args, model_type)
    targets = config.target_modules
    return {"r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "target_modules": sorted(targets) if not isinstance(targets, str) else targets,
            "modules_to_save": sorted(config.modules_to_save or []), "load_in_4bit": args.load_in_4bit,
            "adapter": ADAPTER_DIR, "merged": True}
