"""Recipes are read strictly: a key written twice is refused, and a bad recipe file fails before torch loads."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from relufy.errors import RecipeError
from relufy.recipe import load_recipe

TINY = (REPO / "recipes" / "tiny-cpu.yaml").read_text()


def test_a_key_written_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(TINY + "learning_rate: 0.5\n")
    first = TINY.splitlines().index("learning_rate: 1.0e-4") + 1
    second = len(TINY.splitlines()) + 1
    with pytest.raises(RecipeError) as refused:
        load_recipe(path)
    assert str(refused.value) == (f"recipe {path}: key 'learning_rate' appears twice (lines {first} and {second}); "
                                  "keep one")


def test_a_key_written_twice_inside_a_stage_is_refused(tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text(TINY.replace("{lambda: 0.002, end_step: 4}", "{lambda: 0.002, end_step: 4, lambda: 0.5}"))
    with pytest.raises(RecipeError, match="key 'lambda' appears twice"):
        load_recipe(path)


def test_yaml_merge_keys_still_override(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(TINY.replace("model_config_overrides:\n  num_hidden_layers: 2",
                                 "model_config_overrides:\n  <<: {num_hidden_layers: 3}\n  num_hidden_layers: 2"))
    assert load_recipe(path).model.model_config_overrides == {"num_hidden_layers": 2}


def test_a_set_value_with_a_key_written_twice_is_refused():
    with pytest.raises(RecipeError, match=r"--set model_config_overrides: key 'a' appears twice"):
        load_recipe(REPO / "recipes" / "tiny-cpu.yaml", ["model_config_overrides={a: 1, a: 2}"])


PROBE = """
import sys
from relufy.cli import main
code = main(["train", sys.argv[1]])
# the CLI's parser is transformers' HfArgumentParser (no torch); its model code must stay unloaded
print({"code": code, "loaded": sorted(m for m in ("torch", "transformers.modeling_utils", "relufy.train")
                                      if m in sys.modules)})
"""


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("learning_rate: 1\nlearning_rate: 2\n", "key 'learning_rate' appears twice (lines 1 and 2)"),
])
def test_a_missing_empty_or_repeated_key_recipe_fails_before_torch_is_imported(tmp_path, content, message):
    path = tmp_path / "recipe.yaml"
    if content is not None:
        path.write_text(content)
    result = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"')) == {"code": 2, "loaded": []}
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"relufy train: error: recipe {path}") and message in line
