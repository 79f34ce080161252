"""`relufy train --resume` continues exactly or refuses: the recipe fingerprint and incomplete checkpoints."""

import dataclasses
import json
import shutil

import pytest
from conftest import SAMPLE_TEXT
from tiny_models import save_tiny_checkpoint
from tiny_runs import TINY_RECIPE, recorded_run, tiny_recipe
from transformers import TrainingArguments

from relufy.cli import main
from relufy.configs import DataArguments, ModelArguments, ProSparseConfig
from relufy.errors import TrainingError
from relufy.resume import FINGERPRINT_FILE, FREE_KEYS, TRAINER_KEYS, compared_keys, missing_parts
from relufy.train import train

SETTINGS = ("max_steps=4", "save_steps=2", "logging_steps=1")


@pytest.fixture(scope="module")
def finished_run(silu_base, tmp_path_factory):
    """A 4-step run of the tiny recipe with checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("resume") / "run"
    train(tiny_recipe(silu_base, out, *SETTINGS))
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    """A copy of the finished run that a test may change."""
    return shutil.copytree(finished_run, tmp_path / "run")


def resume(base, out, *overrides, allow_changes=False):
    return train(tiny_recipe(base, out, *SETTINGS, *overrides), resume=True, allow_changes=allow_changes)


def cli_resume(base, out, *overrides) -> list[str]:
    sets = [f"model_name_or_path={base}", "model_config_overrides={}", "block_size=32", f"output_dir={out}",
            "threshold_shift=false", *SETTINGS, *overrides]
    return ["train", str(TINY_RECIPE), *(f"--set={item}" for item in sets), "--resume"]


def test_every_checkpoint_records_the_training_keys_of_the_recipe(finished_run):
    for step in (2, 4):
        saved = json.loads((finished_run / f"checkpoint-{step}" / FINGERPRINT_FILE).read_text())
        fields = saved["fields"]
        assert saved["recipe"] == str(TINY_RECIPE)
        assert fields["learning_rate"] == 1e-4 and fields["max_steps"] == 4 and fields["world_size"] == 1
        assert fields["stages"][0] == {"lambda": 0.0, "end_step": 2} and fields["block_size"] == 32
        assert fields["base.hidden_size"] == 32 and fields["base.model_type"] == "llama"
        assert len(fields["base.weights_sha256"]) == 64
        assert not {"logging_steps", "save_steps", "output_dir", "max_train_minutes"} & set(fields)


def test_the_compared_and_free_keys_name_real_recipe_keys():
    trainer_keys = {f.name for f in dataclasses.fields(TrainingArguments)}
    own_keys = {f.name for group in (ModelArguments, DataArguments, ProSparseConfig)
                for f in dataclasses.fields(group)} - trainer_keys
    assert set(TRAINER_KEYS) <= trainer_keys
    assert set(FREE_KEYS) <= own_keys
    assert own_keys - set(FREE_KEYS) <= set(compared_keys())  # a new relufy key is compared unless listed free
    assert {"learning_rate", "stages", "activation", "data", "lora_r", "seed"} <= set(compared_keys())


def test_a_changed_learning_rate_or_stages_is_refused_in_one_line_naming_old_and_new(silu_base, run, capsys):
    assert main(cli_resume(silu_base, run, "learning_rate=5e-4", "stages.1.lambda=0.5")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "the recipe changed since checkpoint-4" in err
    assert "learning_rate 0.0001 -> 0.0005" in err and '"lambda": 0.5' in err
    assert "--allow-changes" in err and "new output_dir" in err


def test_allow_changes_continues_with_the_new_stages_and_logs_each_change(silu_base, run, caplog):
    shutil.rmtree(run / "checkpoint-4")
    with caplog.at_level("WARNING", logger="relufy.resume"):
        result = resume(silu_base, run, "stages.1.lambda=0.5", "learning_rate=5e-4", allow_changes=True)
    assert result.steps == 4
    assert "stages changed since checkpoint-2" in caplog.text
    assert "learning_rate changed since checkpoint-2: 0.0001 -> 0.0005 (no effect" in caplog.text
    logged = {e["step"]: e for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e}
    assert logged[3]["l1_lambda"] == 0.5 and logged[2]["l1_lambda"] == 0.0  # the new stages, from step 3 on
    assert json.loads((run / "checkpoint-4" / FINGERPRINT_FILE).read_text())["fields"]["stages"][1]["lambda"] == 0.5


def test_allow_changes_without_resume_is_refused(silu_base, tmp_path):
    with pytest.raises(TrainingError, match="--allow-changes only applies with --resume"):
        train(tiny_recipe(silu_base, tmp_path / "new", *SETTINGS), allow_changes=True)


def test_keys_that_do_not_alter_training_may_change_on_resume(silu_base, run):
    shutil.rmtree(run / "checkpoint-4")
    result = resume(silu_base, run, "logging_steps=2", "save_steps=3", "max_train_minutes=60",
                    "threshold_eval_tokens=128", "dataloader_num_workers=0", "report_to=[]")
    assert result.steps == 4


def test_resume_with_another_model_is_refused_before_any_weights_load(silu_base, run, tmp_path, monkeypatch):
    other = save_tiny_checkpoint("llama", tmp_path / "other", SAMPLE_TEXT, hidden_size=64, intermediate_size=96,
                                 hidden_act="relu")

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr("relufy.checkpoint.load_model", no_loading)
    with pytest.raises(TrainingError) as refused:
        resume(other, run, "activation=")
    message = str(refused.value)
    assert "base.hidden_size 32 -> 64" in message and "base.intermediate_size 64 -> 96" in message
    assert f"model_name_or_path {silu_base} -> {other}" in message and "activation relu -> null" in message


def test_an_incomplete_newest_checkpoint_is_skipped_for_the_newest_complete_one(silu_base, run, caplog):
    (run / "checkpoint-4" / "optimizer.pt").unlink()
    with caplog.at_level("WARNING", logger="relufy.resume"):
        result = resume(silu_base, run)
    assert result.steps == 4
    assert ("skipping checkpoint-4: has no optimizer.pt: resuming would restart the optimizer; resuming from "
            "checkpoint-2") in caplog.text
    logged = [e["step"] for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert logged == [1, 2, 3, 4]  # checkpoint-2's history, then steps 3 and 4 trained again


@pytest.mark.parametrize("part, message", [
    ("optimizer.pt", "checkpoint-4 has no optimizer.pt: resuming would restart the optimizer"),
    ("model.safetensors", "checkpoint-4 has no model weights"),
    ("scheduler.pt", "checkpoint-4 has no scheduler.pt: resuming would restart the learning-rate schedule"),
    ("trainer_state.json", "checkpoint-4 has no trainer_state.json"),
    ("rng_state.pth", "checkpoint-4 has no rng_state.pth"),
])
def test_resume_is_refused_when_no_checkpoint_is_complete(silu_base, run, part, message, capsys):
    for step in (2, 4):
        (run / f"checkpoint-{step}" / part).unlink()
    assert main(cli_resume(silu_base, run)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"no complete checkpoint in {run}: {message}" in err and "1 older one(s) are incomplete too" in err


def test_a_checkpoint_without_a_recipe_fingerprint_needs_allow_changes(silu_base, run, caplog):
    shutil.rmtree(run / "checkpoint-4")
    (run / "checkpoint-2" / FINGERPRINT_FILE).unlink()
    with pytest.raises(TrainingError, match=f"checkpoint-2 has no readable {FINGERPRINT_FILE}.*--allow-changes"):
        resume(silu_base, run)
    with caplog.at_level("WARNING", logger="relufy.resume"):
        assert resume(silu_base, run, allow_changes=True).steps == 4
    assert "the recipe is not compared" in caplog.text


def test_resuming_a_finished_run_is_refused_instead_of_training_past_max_steps(silu_base, run):
    with pytest.raises(TrainingError, match="checkpoint-4 is at step 4 and max_steps is 4, so nothing is left"):
        resume(silu_base, run)
    assert resume(silu_base, run, "max_steps=5", "stages.2.end_step=5", allow_changes=True).steps == 5


def deepspeed_layout(folder):
    """The files a DeepSpeed ZeRO-2 checkpoint holds (as `accelerate launch` with zero2.yaml writes them)."""
    (folder / "global_step2").mkdir(parents=True)
    for name in ("global_step2/mp_rank_00_model_states.pt", "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "model.safetensors", "scheduler.pt", "trainer_state.json", "rng_state.pth"):
        (folder / name).write_bytes(b"")
    return folder


def test_a_deepspeed_checkpoint_is_complete_under_deepspeed_only(tmp_path):
    from types import SimpleNamespace

    folder = deepspeed_layout(tmp_path / "checkpoint-2")
    assert missing_parts(folder, SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={}))) == []
    [without] = missing_parts(folder, SimpleNamespace(deepspeed_plugin=None))
    assert without.startswith("has no optimizer.pt") and "resume under the same DeepSpeed launch" in without
    (folder / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    [partial] = missing_parts(folder, SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={})))
    assert "no model and optimizer states in its global_stepN folder" in partial


# -- exact continuation ----------------------------------------------------------------------------
def test_resume_continues_the_schedule_and_data_order_exactly(silu_base, tmp_path):
    settings = ["max_steps=8", "save_steps=3", "logging_steps=1"]
    full, full_logs = recorded_run(tiny_recipe(silu_base, tmp_path / "full", *settings))
    first, _ = recorded_run(tiny_recipe(silu_base, tmp_path / "cut", *settings), stop_at=4)
    assert (tmp_path / "cut" / "checkpoint-3").is_dir() and not (tmp_path / "cut" / "checkpoint-6").exists()
    rest, rest_logs = recorded_run(tiny_recipe(silu_base, tmp_path / "cut", *settings), resume=True)

    assert first == full[: len(first)]
    assert rest[0][0] == 4  # resumed from checkpoint-3: step 4 is redone
    assert rest == full[len(full) - len(rest):]
    assert {step for step, _, _ in full} == set(range(1, 9))
    assert [e["step"] for e in rest_logs] == [e["step"] for e in full_logs] == list(range(1, 9))
    for resumed, uninterrupted in zip(rest_logs, full_logs):  # the checkpoint's history, then the resumed steps
        assert resumed["l1_lambda"] == uninterrupted["l1_lambda"]
        assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-4)


def test_max_train_minutes_stops_with_a_checkpoint_that_resume_finishes_exactly(silu_base, tmp_path, capsys):
    settings = ["max_steps=6", "logging_steps=2", "save_steps=100"]
    full, _ = recorded_run(tiny_recipe(silu_base, tmp_path / "full", *settings))
    cut = tmp_path / "cut"
    overrides = [f"model_name_or_path={silu_base}", "model_config_overrides={}", "block_size=32", f"output_dir={cut}",
                 "threshold_shift=false", *settings]
    assert main(["train", str(TINY_RECIPE), *(f"--set={o}" for o in overrides), "--set=max_train_minutes=1e-9"]) == 0
    assert "stopped at step 2 of 6" in capsys.readouterr().out  # the first logging step past the limit
    assert (cut / "checkpoint-2").is_dir() and not (cut / "config.json").exists()  # no final model yet
    rest, _ = recorded_run(tiny_recipe(silu_base, cut, *settings), resume=True)
    assert rest[0][0] == 3 and rest == full[len(full) - len(rest):]
    assert (cut / "config.json").exists()


def test_resume_without_a_checkpoint_and_a_rerun_without_resume_are_refused(silu_base, tmp_path):
    recipe = tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_steps=2")
    with pytest.raises(TrainingError, match="holds no checkpoint-N"):
        train(recipe, resume=True)
    train(recipe)
    with pytest.raises(TrainingError, match="pass --resume to continue"):
        train(tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_steps=2"))
    summary = train(tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_steps=2"), force=True)
    assert summary.steps == 2
