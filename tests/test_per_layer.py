"""Per-layer FATReLU thresholds as a checkpoint: `relufy convert --layer-thresholds MATCHED.json` writes the model
`relufy matched` measured, relufy's loader and the shipped remote code run it exactly, and nothing else runs it
with other thresholds."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SAMPLE_TEXT
from tiny_models import save_tiny_checkpoint

import relufy
from relufy.activations import module_class
from relufy.architectures import activation_modules
from relufy.cett import thresholded_perplexity
from relufy.checkpoint import load_model
from relufy.cli import main
from relufy.errors import ActivationError
from relufy.matched import threshold_mask
from relufy.per_layer import LAYER_THRESHOLDS_KEY

SMALL = ["--heldout-tokens", "512", "--calibration-tokens", "512", "--block-size", "64", "--batch-size", "4",
         "--no-suite"]


@pytest.fixture(scope="module")
def relu_model(tmp_path_factory):
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("relu") / "tiny-relu", SAMPLE_TEXT,
                                hidden_act="relu", num_hidden_layers=3)


@pytest.fixture(scope="module")
def matched_json(relu_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("matched") / "matched.json"
    assert main(["matched", str(relu_model), "-t", "0.8,0.9", "-o", str(out), *SMALL]) == 0
    return out


@pytest.fixture(scope="module")
def per_layer_model(relu_model, matched_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "per-layer"
    assert main(["convert", str(relu_model), str(out), "--activation", "fatrelu", "--layer-thresholds", str(matched_json),
                 "--matched-target", "0.9"]) == 0
    return out


def _ids():
    return torch.arange(3, 67).reshape(2, 32)


def test_the_checkpoint_lists_the_measured_thresholds(per_layer_model, matched_json):
    config = json.loads((per_layer_model / "config.json").read_text())
    thresholds = json.loads(matched_json.read_text())["targets"][1]["thresholds"]
    assert config["hidden_act"] == "fatrelu" and config[LAYER_THRESHOLDS_KEY] == thresholds
    assert len(set(thresholds)) == 3  # three layers, three different thresholds
    assert "auto_map" in config and (per_layer_model / "modeling_relufy.py").is_file()


def test_relufys_loader_runs_the_model_matched_measured(per_layer_model, relu_model, matched_json):
    """Same perplexity and zeros as the thresholded ReLU model `relufy matched` measured (on its own blocks)."""
    thresholds = json.loads(matched_json.read_text())["targets"][1]["thresholds"]
    model = load_model(per_layer_model).eval()
    assert [m.threshold for m in activation_modules(model)] == thresholds
    assert model.config.hidden_act == "fatrelu" and getattr(model.config, LAYER_THRESHOLDS_KEY) == thresholds
    relu = load_model(relu_model).eval()
    blocks = _ids()
    expected = thresholded_perplexity(relu, blocks, threshold_mask(relu), thresholds)
    assert thresholded_perplexity(model, blocks, threshold_mask(model), [0.0] * 3) == expected


def test_saving_and_loading_again_keeps_the_thresholds(per_layer_model, tmp_path):
    model = load_model(per_layer_model)
    model.save_pretrained(tmp_path / "again")
    again = load_model(tmp_path / "again")
    assert [m.threshold for m in activation_modules(again)] == [m.threshold for m in activation_modules(model)]


CLEAN_LOAD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert "relufy" not in sys.modules, "relufy must not be imported"
    print([layer.mlp.act_fn.threshold for layer in model.model.layers])
    with torch.no_grad():
        torch.save(model(input_ids=torch.arange(3, 67).reshape(2, 32)).logits, sys.argv[2])
""")


def test_plain_transformers_with_the_remote_code_runs_the_same_model(per_layer_model, tmp_path):
    logits_file = tmp_path / "logits.pt"
    done = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(per_layer_model), str(logits_file)], check=True,
                          cwd=tmp_path, capture_output=True, text=True)
    thresholds = json.loads((per_layer_model / "config.json").read_text())[LAYER_THRESHOLDS_KEY]
    assert done.stdout.strip() == str(thresholds)
    with torch.no_grad():
        expected = load_model(per_layer_model).eval()(input_ids=_ids()).logits
    torch.testing.assert_close(torch.load(logits_file, weights_only=True), expected, rtol=1e-5, atol=1e-5)


def test_without_relufys_loader_or_the_remote_code_it_stops_with_the_way_to_load_it(per_layer_model):
    from transformers import AutoModelForCausalLM

    relufy.register_activations()
    with pytest.raises(ActivationError, match="relufy_layer_thresholds.*trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(per_layer_model)


def test_one_threshold_for_every_layer_is_the_plain_fatrelu_name(relu_model, tmp_path):
    uniform = tmp_path / "uniform.json"
    assert main(["matched", str(relu_model), "-t", "0.9", "--uniform", "-o", str(uniform), *SMALL]) == 0
    out = tmp_path / "one"
    assert main(["convert", str(relu_model), str(out), "--activation", "fatrelu", "--layer-thresholds",
                 str(uniform)]) == 0
    config = json.loads((out / "config.json").read_text())
    threshold = json.loads(uniform.read_text())["targets"][0]["thresholds"][0]
    assert config["hidden_act"] == f"fatrelu_{threshold!r}" and LAYER_THRESHOLDS_KEY not in config
    model = load_model(out)
    assert all(isinstance(m, module_class("fatrelu")) and m.threshold == threshold for m in activation_modules(model))


def _convert_error(capsys, *argv) -> str:
    assert main(["convert", *argv]) == 2
    return capsys.readouterr().err.strip()


def test_thresholds_that_are_no_fatrelu_models_are_refused(relu_model, matched_json, tmp_path, capsys):
    x1 = tmp_path / "x1.json"
    assert main(["matched", str(relu_model), "-t", "0.9", "--threshold-on", "x1", "-o", str(x1), *SMALL]) == 0
    capsys.readouterr()
    out = str(tmp_path / "out")
    err = _convert_error(capsys, str(relu_model), out, "--activation", "fatrelu", "--layer-thresholds", str(x1))
    assert "thresholds are on x1" in err and "--threshold-on activation" in err and len(err.splitlines()) == 1
    err = _convert_error(capsys, str(relu_model), out, "--activation", "fatrelu", "--layer-thresholds", str(matched_json))
    assert "holds targets [0.8, 0.9]; choose one with --matched-target" in err
    err = _convert_error(capsys, str(relu_model), out, "--activation", "fatrelu", "--layer-thresholds", str(matched_json),
                         "--matched-target", "0.7")
    assert "has no target 0.7" in err
    err = _convert_error(capsys, str(relu_model), out, "--layer-thresholds", str(matched_json), "--matched-target", "0.9")
    assert "pass --activation fatrelu" in err
    silu = save_tiny_checkpoint("llama", tmp_path / "silu", SAMPLE_TEXT, num_hidden_layers=3)
    err = _convert_error(capsys, str(silu), out, "--activation", "fatrelu", "--layer-thresholds", str(matched_json),
                         "--matched-target", "0.9")
    assert "need a relu or fatrelu_<t> model, this one uses 'silu'" in err
    assert not (tmp_path / "out").exists()


def test_a_recipe_cannot_name_the_bare_fatrelu():
    from relufy.configs import ModelArguments
    from relufy.errors import RecipeError

    with pytest.raises(RecipeError, match="fatrelu_<t>"):
        ModelArguments(model_name_or_path="x", activation="fatrelu")


def test_a_json_of_another_model_is_refused(relu_model, matched_json, tmp_path, capsys):
    """relu and relu-kd share activation and layer count: only the JSON's identity (config and weights) tells them
    apart, so another model's thresholds are never written into this one."""
    other = save_tiny_checkpoint("llama", tmp_path / "other", SAMPLE_TEXT, seed=1, hidden_act="relu",
                                 num_hidden_layers=3)
    err = _convert_error(capsys, str(other), str(tmp_path / "out"), "--activation", "fatrelu", "--layer-thresholds",
                         str(matched_json), "--matched-target", "0.9")
    assert "measured on another model than this one" in err and "run relufy matched on this model" in err


def test_training_from_a_per_layer_model_is_refused(per_layer_model, tmp_path):
    """The threshold shift, the saved model and its remote code each hold one activation: they would drop the
    per-layer thresholds, so the run stops before any step."""
    from tiny_runs import tiny_recipe

    from relufy.errors import TrainingError
    from relufy.train import train

    with pytest.raises(TrainingError, match="per-layer FATReLU thresholds.*train the model it was converted from"):
        train(tiny_recipe(per_layer_model, tmp_path / "run", "activation=null"))


def test_layer_counts_and_lists_are_read_as_transformers_reads_them():
    from relufy.per_layer import checked, ffn_layers, layer_thresholds

    assert ffn_layers({"model_type": "gpt2", "n_layer": 5}) == 5  # GPT-2 names it n_layer
    assert ffn_layers({"model_type": "llama", "num_hidden_layers": 3}) == 3
    for bad in (0.1, [True, 0.1], ["0.1", 0.2], [0.1, float("nan")], [-0.1, 0.2], []):
        with pytest.raises(ActivationError, match="relufy_layer_thresholds|finite number >= 0"):
            checked(layer_thresholds({LAYER_THRESHOLDS_KEY: bad}), None, "config.json")
    with pytest.raises(ActivationError, match="2 per-layer thresholds for a model with 3 FFN layers; write them"):
        checked([0.1, 0.2], 3, "config.json")


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_a_model_cut_to_fewer_layers_keeps_their_thresholds(per_layer_model, trust_remote_code):
    """model_config_overrides' num_hidden_layers (a recipe's cut, a teacher's) keeps the first layers' thresholds,
    with relufy's loader alone and through the remote code."""
    thresholds = json.loads((per_layer_model / "config.json").read_text())[LAYER_THRESHOLDS_KEY]
    model = load_model(per_layer_model, trust_remote_code=trust_remote_code, config_overrides={"num_hidden_layers": 2})
    assert [m.threshold for m in activation_modules(model)] == thresholds[:2]
    assert getattr(model.config, LAYER_THRESHOLDS_KEY) == thresholds[:2] and model.config.hidden_act == "fatrelu"
