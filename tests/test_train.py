"""`relufy train` end to end on CPU with tiny checkpoints (relufy.train): a whole run, its output folder, its
refusals of bad input, the final save."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import SAMPLE_TEXT
from tiny_runs import TINY_RECIPE, tiny_recipe

from relufy.cli import main
from relufy.errors import DataError, TrainingError
from relufy.recipe import load_recipe
from relufy.train import build_trainer, train


# -- a whole run: logging, plot, config, threshold shift -------------------------------------------
def test_a_run_logs_lambda_l1_and_sparsity_plots_them_and_records_the_threshold(silu_base, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(TINY_RECIPE), "--set", f"model_name_or_path={silu_base}",
                 "--set", "model_config_overrides={}", "--set", "block_size=32", "--set", f"output_dir={out}",
                 "--set", "max_steps=6", "--set", "report_to=[tensorboard]", "--set", "threshold_shift=true",
                 "--set", "threshold_eval_tokens=256", "--set", "threshold_search_steps=2",
                 "--set", "threshold_max_ppl_increase=0.05"])
    assert code == 0
    assert f"wrote {out} after 6 steps" in capsys.readouterr().out

    schedule = load_recipe(TINY_RECIPE).schedule
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5, 6]
    for entry in logged:
        assert entry["l1_lambda"] == pytest.approx(schedule.lambda_at(entry["step"]))
        assert entry["l1_loss"] > 0
        assert 0.0 < entry["activation_sparsity"] < 1.0
        if entry["l1_lambda"] > 0:
            assert entry["loss"] == pytest.approx(entry["lm_loss"] + entry["l1_lambda"] * entry["l1_loss"], rel=1e-3)
    assert {entry["l1_lambda"] for entry in logged} == {0.0, 0.002, schedule.lambda_at(5), schedule.lambda_at(6)}

    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["relufy"]["training"]["stages"] == schedule.describe()
    shift = config["relufy"]["threshold_shift"]
    assert 0 <= shift["threshold"] <= 0.05
    assert shift["perplexity_after"] <= shift["perplexity_before"] * 1.05
    assert shift["sparsity_after"] >= shift["sparsity_before"]
    assert config["hidden_act"] == (f"fatrelu_{shift['threshold']!r}" if shift["threshold"] > 0 else "relu")
    assert config["relufy"]["activation"] == config["hidden_act"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p.parent for p in out.rglob("events.out.tfevents.*")]
    assert runs, "report_to tensorboard wrote no event file"
    tags = set().union(*(EventAccumulator(str(run)).Reload().Tags()["scalars"] for run in runs))
    assert {"train/l1_lambda", "train/l1_loss", "train/activation_sparsity", "train/loss"} <= tags


# -- the output folder ------------------------------------------------------------------------------


def test_a_finished_run_without_checkpoints_is_replaced_only_with_force(silu_base, tmp_path):
    recipe = tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_strategy='no'")
    train(recipe)
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="already holds a trained model; pass --force"):
        train(tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_strategy='no'"))
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    assert train(tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_strategy='no'"), force=True).steps == 2


def test_a_run_on_a_relufy_trained_checkpoint_replaces_its_record_and_drops_its_old_shift(silu_base, tmp_path):
    """A base that carries an earlier run's record (a conversion of a trained checkpoint carries it): the new
    run's record replaces it, and the earlier shift, which calibrated other weights, is not left behind."""
    from relufy.activations import make_activation
    from relufy.checkpoint import read_provenance, update_provenance
    from relufy.convert import convert_checkpoint

    base = convert_checkpoint(silu_base, tmp_path / "base", make_activation("relu"))
    update_provenance(base, training={"steps": 99}, threshold_shift={"threshold": 0.03})
    train(tiny_recipe(base, tmp_path / "run", "max_steps=2", "save_strategy='no'"))
    provenance = read_provenance(tmp_path / "run")
    assert provenance.training["steps"] == 2 and provenance.threshold_shift is None
    assert (provenance.original_activation, provenance.activation) == ("silu", "relu")


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_liger_without_liger_kernel_installed_is_refused_before_any_work(silu_base, tmp_path):
    with pytest.raises(TrainingError, match=r"needs liger-kernel.*relufy\[liger\]"):
        train(tiny_recipe(silu_base, tmp_path / "out", "use_liger_kernel=true"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("zero3", [False, True])
def test_liger_fused_loss_is_turned_off_under_zero3_only(tmp_path, monkeypatch, zero3):
    import transformers.integrations

    from relufy.train import keep_liger_loss_off_under_zero3

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: zero3)
    training = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "use_liger_kernel=true"]).training
    keep_liger_loss_off_under_zero3(training)
    assert training.liger_kernel_config.get("fused_linear_cross_entropy", True) is not zero3
    assert training.liger_kernel_config["swiglu"] is False


def test_a_non_relu_base_with_positive_lambda_is_refused_with_a_hint(silu_base, tmp_path):
    with pytest.raises(TrainingError, match="uses 'silu', not a ReLU-family activation.*activation: relu"):
        train(tiny_recipe(silu_base, tmp_path / "run", "activation=null"))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_an_interrupted_final_save_leaves_no_half_written_model(silu_base, tmp_path, monkeypatch):
    import transformers.modeling_utils

    original = transformers.modeling_utils.safe_save_file
    saves = []

    def save_file(tensors, filename, metadata=None):
        saves.append(filename)
        if len(saves) == 3:  # checkpoint-2, checkpoint-4, then the final model: SIGTERM arrives mid-write
            Path(filename).write_bytes(b"half")
            raise KeyboardInterrupt
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(silu_base, tmp_path / "run", "max_steps=4", "save_steps=2"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".base-relu.relufy-lock", ".relufy-output",
                                                                   "base-relu", "checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("text, message", [
    ("One short document.\n\nAnother one.\n", "needed"),
    ("A single paragraph without any break at all.\n", "at least 2 are needed"),
])
def test_data_too_short_for_one_step_is_refused(silu_base, tmp_path, text, message):
    data = tmp_path / "tiny.txt"
    data.write_text(text)
    with pytest.raises(DataError, match=message):
        train(tiny_recipe(silu_base, tmp_path / "run", f"data={data}"))


def test_held_out_data_replaces_the_split_and_feeds_the_threshold_search(silu_base, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("\n\n".join(SAMPLE_TEXT.read_text().split("\n\n")[:40]))
    with_file, held_out = build_trainer(tiny_recipe(silu_base, tmp_path / "a", f"held_out_data={held}"))
    split, split_held_out = build_trainer(tiny_recipe(silu_base, tmp_path / "b"))
    assert len(with_file.train_dataset) > len(split.train_dataset)  # nothing of `data` was held out
    assert held_out["input_ids"] != split_held_out["input_ids"]
    empty = tmp_path / "empty.txt"
    empty.write_text("Too short.\n")
    with pytest.raises(DataError, match="held-out text"):
        build_trainer(tiny_recipe(silu_base, tmp_path / "c", f"held_out_data={empty}", "threshold_shift=true"))


def test_layers_left_out_on_purpose_are_not_reported_as_unexpected_keys(silu_base, tmp_path):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    transformers_logger.addHandler(handler)
    try:
        build_trainer(tiny_recipe(silu_base, tmp_path / "run", "model_config_overrides={num_hidden_layers: 1}"))
    finally:
        transformers_logger.removeHandler(handler)
    assert not [r for r in records if "UNEXPECTED" in r.getMessage()]
