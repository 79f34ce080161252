"""Recipes: the shipped YAMLs load, `--set` overrides apply, and every mistake is one clear RecipeError."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from relufy.cli import main
from relufy.errors import RecipeError
from relufy.recipe import load_recipe, resolve_model_path

RECIPES = REPO / "recipes"
SHIPPED = ["prosparse-llama2-7b.yaml", "prosparse-smollm2-135m.yaml", "relu-only.yaml", "tiny-cpu.yaml"]


def base_recipe(**changes) -> dict:
    recipe = yaml.safe_load((RECIPES / "tiny-cpu.yaml").read_text())
    recipe.update(changes)
    return recipe


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads_and_validates(name):
    recipe = load_recipe(RECIPES / name, [] if torch.cuda.is_available() else ["bf16=false"])
    assert recipe.training.max_steps > 0
    assert recipe.schedule.last_step >= recipe.training.max_steps
    assert recipe.training.output_dir


@pytest.mark.parametrize("name", [name for name in SHIPPED if not name.startswith("tiny")])
def test_gpu_recipes_drop_an_epochs_short_last_batch(name):
    """A short batch changes the step's shapes: torch.compile and Liger's compiled distillation loss recompile
    for it, and torch 2.11 failed there mid-run. Every step of a GPU recipe gets the same tokens."""
    recipe = load_recipe(RECIPES / name, ["bf16=false"])
    assert recipe.training.dataloader_drop_last


def test_llama2_7b_recipe_carries_the_paper_schedule_and_lr():
    recipe = load_recipe(RECIPES / "prosparse-llama2-7b.yaml", ["bf16=false"])
    assert recipe.schedule.describe() == [
        {"lambda": 0.0, "end_step": 5000}, {"lambda": 5e-3, "end_step": 6000},
        {"lambda": 5e-2, "end_step": 10000}, {"lambda": 5e-2, "end_step": 12000},
        {"lambda": 2e-1, "end_step": 16000}, {"lambda": 2e-1, "end_step": 16500}]
    assert recipe.training.learning_rate == 3e-5
    assert recipe.training.lr_scheduler_type == "cosine"
    assert recipe.data.block_size == 4096


def test_relu_only_recipe_never_regularizes():
    recipe = load_recipe(RECIPES / "relu-only.yaml", ["bf16=false"])
    assert recipe.schedule.max_lambda == 0.0


def test_set_overrides_reach_nested_stages_and_trainer_keys():
    recipe = load_recipe(RECIPES / "tiny-cpu.yaml", [
        "stages.2.lambda=0.5", "learning_rate=3e-4", "max_steps=6", "model_config_overrides.num_hidden_layers=1",
        "report_to=[tensorboard]"])
    assert recipe.schedule.stages[2].lam == 0.5
    assert recipe.training.learning_rate == pytest.approx(3e-4)  # YAML 1.1 reads '3e-4' as text: coerced
    assert recipe.training.max_steps == 6
    assert recipe.model.model_config_overrides == {"num_hidden_layers": 1}
    assert recipe.training.report_to == ["tensorboard"]


def test_exponent_floats_in_the_yaml_file_are_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_recipe()).replace("learning_rate: 0.0001", "learning_rate: 2e-5"))
    assert "2e-5" in path.read_text()
    assert load_recipe(path).training.learning_rate == pytest.approx(2e-5)


@pytest.mark.parametrize("changes, message", [
    ({"learning_rat": 1e-4}, r"unknown key\(s\) 'learning_rat' \(did you mean 'learning_rate'\?\)"),
    ({"max_steps": "many"}, "'max_steps' must be an integer"),
    ({"max_steps": 2.5}, "'max_steps' must be an integer"),
    ({"threshold_shift": "yes please"}, "'threshold_shift' must be true/false"),
    ({"stages": {"lambda": 1}}, "'stages' must be a list"),
    ({"lr_scheduler_type": "zigzag"}, "zigzag is not a valid SchedulerType"),
    ({"stages": [{"lambda": 0.1, "end_step": 8}, {"lambda": 0.2, "end_step": 4}]}, "greater than the previous"),
    ({"stages": [{"lambda": -0.1, "end_step": 8}]}, "lambda must be >= 0"),
    ({"stages": [{"lambda": 0.1, "end_step": 4}]}, "stages end at step 4 but max_steps is 8"),
    ({"max_steps": -1}, "max_steps must be > 0"),
    ({"activation": "swish"}, "unknown activation 'swish'"),
    ({"held_out_fraction": 1.5}, r"held_out_fraction must be a finite number in \(0, 1\)"),
    ({"data": None}, "lacks 'data'"),
    ({"output_dir": ""}, "lacks 'output_dir'"),
    ({"use_liger_kernel": True, "liger_kernel_config": {"swiglu": True}}, "liger_kernel_config.swiglu would replace"),
    ({"max_train_minutes": 0}, r"max_train_minutes \(or empty\) must be a finite number in \(0, "),
])
def test_invalid_recipes_are_refused_with_the_key_named(changes, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, base=base_recipe(**changes))


def test_liger_kernels_never_take_over_the_converted_mlp():
    """Liger's SwiGLU/GeGLU kernels hard-code SiLU/GELU: relufy keeps them off, the other kernels stay the user's."""
    recipe = load_recipe(None, base=base_recipe(use_liger_kernel=True, liger_kernel_config={"rope": False}))
    assert recipe.training.liger_kernel_config == {"rope": False, "swiglu": False, "geglu": False, "relu_squared": False}
    assert load_recipe(None, base=base_recipe()).training.liger_kernel_config is None


@pytest.mark.parametrize("override, message", [
    ("max_steps", "must look like key=value"),
    ("stages.7.lambda=1", "index 7 is out of range"),
    ("stages.first.lambda=1", "must be a list index"),
    ("max_stepz=3", "did you mean 'max_steps'"),
])
def test_bad_overrides_are_refused(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPES / "tiny-cpu.yaml", [override])


def test_missing_empty_and_malformed_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("stages: [\n  {lambda: 1\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_package_paths_resolve_to_files_shipped_in_installed_packages():
    assert Path(resolve_model_path("pkg:relufy/__init__.py")).is_file()
    assert resolve_model_path("some/dir") == "some/dir"
    with pytest.raises(RecipeError, match="no installed package"):
        resolve_model_path("pkg:not_a_package_xyz/model.gguf")
    with pytest.raises(RecipeError, match="has no file"):
        resolve_model_path("pkg:relufy/missing.gguf")


def test_cli_reports_a_recipe_error_in_one_line(tmp_path, capsys):
    code = main(["train", str(RECIPES / "tiny-cpu.yaml"), "--set", "stages.1.lambda=-1",
                 "--set", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("relufy train: error: ") and "stages[1].lambda" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# -- paths and launch ------------------------------------------------------------------------------
def test_relative_input_paths_resolve_against_the_recipe_folder_and_set_paths_against_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(RECIPES / "tiny-cpu.yaml")
    assert Path(recipe.data.data).resolve() == REPO / "data" / "sample.txt"
    assert recipe.training.output_dir == "runs/tiny-cpu"  # outputs stay relative to the current directory
    (tmp_path / "mine.txt").write_text("text")
    assert load_recipe(RECIPES / "tiny-cpu.yaml", ["data=mine.txt"]).data.data == "mine.txt"


def test_a_missing_data_file_is_refused_before_any_work_naming_the_folder_it_resolved_against(tmp_path, monkeypatch):
    from relufy.errors import DataError
    from relufy.train import train

    (tmp_path / "recipes").mkdir()
    recipe_file = tmp_path / "recipes" / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(base_recipe(data="corpus/train.txt", output_dir="out")))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"'corpus/train.txt'; relative paths in a recipe resolve against its "
                                        rf"folder {tmp_path / 'recipes'}\)"):
        train(load_recipe(recipe_file))
    assert not (tmp_path / "out").exists()  # nothing converted or written


def test_the_shipped_smollm2_recipe_needs_the_corpus_and_names_the_command_that_builds_it(tmp_path, monkeypatch):
    from relufy.errors import DataError
    from relufy.train import train

    for name in ("prosparse-smollm2-135m.yaml", "relu-only.yaml"):
        copy = tmp_path / "recipes" / name  # the corpus path ../runs/corpus resolves inside tmp_path: absent
        copy.parent.mkdir(exist_ok=True)
        copy.write_text((RECIPES / name).read_text())
        recipe = load_recipe(copy, [f"output_dir={tmp_path / 'out'}", "bf16=false"])
        assert "sample.txt" not in recipe.data.data
        with pytest.raises(DataError, match=r"train.txt.gz' does not exist.*python scripts/build_corpus.py --out "
                                            r"runs/corpus"):
            train(recipe)
        assert not (tmp_path / "out").exists()


def test_more_processes_than_visible_gpus_says_to_pass_num_processes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RecipeError, match="started 8 processes on this machine but 1 GPU.*--num_processes 1 to "
                                          "accelerate launch"):
        load_recipe(RECIPES / "tiny-cpu.yaml", ["use_cpu=false"])
