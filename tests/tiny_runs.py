"""The tiny training recipe and a recorded run, shared by the training tests (train, resume, distillation)."""

import hashlib
from pathlib import Path

from conftest import REPO
from transformers import TrainerCallback

from relufy.recipe import load_recipe
from relufy.train import build_trainer, run_training

TINY_RECIPE = REPO / "recipes" / "tiny-cpu.yaml"


def tiny_recipe(base: Path, out: Path, *overrides: str):
    return load_recipe(TINY_RECIPE, [
        f"model_name_or_path={base}", "model_config_overrides={}", "block_size=32", f"output_dir={out}",
        "threshold_shift=false", "threshold_eval_tokens=256", "threshold_search_steps=2", *overrides])


def recorded_run(recipe, *, resume=False, stop_at=None):
    """Run a recipe and return (step, lambda, batch digest) for every micro-batch and the log history."""
    trainer, held_out = build_trainer(recipe, resume=resume)
    seen = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            digest = hashlib.sha1(inputs["input_ids"].numpy().tobytes()).hexdigest()
            seen.append((trainer.state.global_step + 1, trainer.lambda_for_next_step(), digest))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    if stop_at is not None:
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == stop_at:
                    control.should_training_stop = True
        trainer.add_callback(Stop())
    run_training(trainer, recipe, held_out, resume=resume)
    return seen, [e for e in trainer.state.log_history if "loss" in e]
