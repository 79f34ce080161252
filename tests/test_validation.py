"""Every option and input checked up front: a bad number, dtype, device, text row or config value is one line
and a non-zero exit before any model loads, never a traceback, a NaN in a table or a bare NaN in a JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, SAMPLE_TEXT

from relufy.cli import main
from relufy.data import load_text_dataset
from relufy.errors import DataError

HUGE = str(10**15)


def run_cli(capsys, *argv) -> tuple[int, str]:
    """`relufy ARGV` in-process: its exit code (argparse's too) and its stderr."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


def assert_one_line_error(code, err, *mentions):
    """A non-zero exit and one line from relufy (progress bars of datasets may come before it), no traceback."""
    assert code not in (0, None), err
    ours = [line for line in err.splitlines() if line.startswith("relufy")]
    assert len(ours) == 1 and ours[0] == err.splitlines()[-1] and "Traceback" not in err, err
    assert ": error: " in ours[0]
    for word in mentions:
        assert word in ours[0], err


def command_line(command: str, model, tmp_path) -> list:
    return {"sparsity": ["sparsity", model, "--data", SAMPLE_TEXT],
            "evaluate": ["evaluate", model, "--output", tmp_path / "eval"],
            "matched": ["matched", model, "--target", "0.9", "--output", tmp_path / "m.json", "--no-suite"],
            "speed": ["speed", model, "--output", tmp_path / "s.json"],
            "convert": ["convert", model, tmp_path / "out"]}[command]


NUMERIC_OPTIONS = {
    "sparsity": ["--max-tokens", "--block-size", "--batch-size"],
    "evaluate": ["--batch-size", "--heldout-tokens", "--block-size", "--max-length", "--limit", "--p"],
    "matched": ["--heldout-tokens", "--calibration-tokens", "--block-size", "--batch-size", "--max-length",
                "--limit", "--target"],
    "speed": ["--batch-sizes", "--prompt-tokens", "--new-tokens", "--generate-tokens"],
}
CASES = [(command, flag, value) for command, flags in NUMERIC_OPTIONS.items() for flag in flags
         for value in ("0", "-3", HUGE)]
CASES += [("sparsity", "--threshold", "nan"), ("sparsity", "--threshold", "-1"), ("evaluate", "--num-fewshot", "-1"),
          ("evaluate", "--num-fewshot", HUGE), ("evaluate", "--limit", "nan"), ("evaluate", "--p", "nan"),
          ("matched", "--target", "1"), ("matched", "--target", "nan"), ("speed", "--seed", "-1")]
CASES += [(command, "--dtype", "float8") for command in ("sparsity", "evaluate", "matched", "speed", "convert")]


@pytest.mark.parametrize("command, flag, value", CASES)
def test_every_numeric_option_of_every_command_refuses_zero_negative_and_absurd_values(
        relu_checkpoint, tmp_path, capsys, command, flag, value):
    code, err = run_cli(capsys, *command_line(command, relu_checkpoint, tmp_path), flag, value)
    assert_one_line_error(code, err, f"relufy {command}: error:", flag)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be written"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA device")
@pytest.mark.parametrize("command", ["sparsity", "evaluate", "matched", "speed"])
def test_cuda_without_a_cuda_device_is_one_line_naming_the_fix(relu_checkpoint, tmp_path, capsys, command):
    code, err = run_cli(capsys, *command_line(command, relu_checkpoint, tmp_path), "--device", "cuda")
    assert_one_line_error(code, err, "--device cuda: no CUDA device is visible; use --device cpu")


@pytest.mark.parametrize("device", ["gpu", "meta", "cpu:x"])
def test_a_device_torch_cannot_place_a_model_on_is_refused(relu_checkpoint, tmp_path, capsys, device):
    code, err = run_cli(capsys, *command_line("sparsity", relu_checkpoint, tmp_path), "--device", device)
    assert_one_line_error(code, err, f"--device {device}")


@pytest.mark.parametrize("command", ["sparsity", "evaluate", "matched"])
def test_a_block_longer_than_the_models_context_is_refused_before_the_weights_load(
        relu_checkpoint, tmp_path, capsys, monkeypatch, command):
    import relufy.checkpoint

    def must_not_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(relufy.checkpoint, "load_model", must_not_load)
    extra = ["--heldout-tokens", "4096"] if command != "sparsity" else []
    code, err = run_cli(capsys, *command_line(command, relu_checkpoint, tmp_path), "--block-size", "128", *extra)
    assert_one_line_error(code, err, "--block-size 128 is longer than", "context of 64 tokens")


TRAIN_CASES = [("block_size", v) for v in ("0", "-1", HUGE)] + [
    ("max_steps", "0"), ("max_steps", "-1"), ("per_device_train_batch_size", "0"),
    ("per_device_train_batch_size", HUGE), ("gradient_accumulation_steps", "-2"), ("learning_rate", ".nan"),
    ("learning_rate", "-1"), ("learning_rate", "1.0e+9"), ("weight_decay", ".nan"), ("max_grad_norm", "-1"),
    ("held_out_fraction", "0"), ("held_out_fraction", "1.5"), ("max_train_blocks", "0"),
    ("max_train_minutes", "0"), ("max_train_minutes", ".inf"), ("threshold_max", ".nan"),
    ("threshold_search_steps", "0"), ("threshold_search_steps", HUGE), ("threshold_eval_tokens", "-5"),
    ("preprocessing_num_workers", "0"), ("model_dtype", "float8"), ("model_config_overrides", "{rms_norm_eps: .nan}"),
    ("activation", "fatrelu_nan"),
]


@pytest.mark.parametrize("key, value", TRAIN_CASES)
def test_every_numeric_recipe_key_refuses_zero_negative_nan_and_absurd_values(tmp_path, capsys, key, value):
    code, err = run_cli(capsys, "train", REPO / "recipes" / "tiny-cpu.yaml", "--set", f"output_dir={tmp_path / 'run'}",
                        "--set", f"{key}={value}")
    assert_one_line_error(code, err, "relufy train: error:", key)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("use_peft, key, value", [(True, "lora_r", "0"), (True, "lora_r", HUGE),
                                                   (True, "lora_alpha", "-1"), (True, "lora_dropout", ".nan")])
def test_lora_keys_are_checked_too(tmp_path, capsys, use_peft, key, value):
    code, err = run_cli(capsys, "train", REPO / "recipes" / "tiny-cpu.yaml", "--set", f"output_dir={tmp_path / 'run'}",
                        "--set", "use_peft=true", "--set", f"{key}={value}")
    assert_one_line_error(code, err, key)


def test_a_train_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("mine")
    code, err = run_cli(capsys, "train", REPO / "recipes" / "tiny-cpu.yaml", "--set", f"output_dir={tmp_path / 'run'}")
    assert_one_line_error(code, err, "output_dir", "is a file")
    assert (tmp_path / "run").read_text() == "mine"


@pytest.mark.parametrize("name, content, where, got", [
    ("numbers.jsonl", '{"text": 5}\n{"text": 7}\n', "line 1", "int"),
    ("mixed.jsonl", '{"text": "a sentence"}\n{"text": 5}\n', "line 2", "int"),
    ("lists.jsonl", '{"text": ["a", "b"]}\n', "line 1", "list"),
    ("objects.jsonl", '{"text": "a sentence"}\n{"text": {"a": 1}}\n', "line 2", "dict"),
    ("numbers.json", '[{"text": 3.5}, {"text": "b"}]', "row 1", "float"),
    ("booleans.json", '[{"text": "a"}, {"text": true}]', "row 2", "bool"),
])
def test_a_text_row_that_is_not_a_string_names_the_file_and_row(tmp_path, name, content, where, got):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        load_text_dataset(str(path))
    assert str(caught.value) == f"{path} {where}: 'text' must be a string, got {got}"


def test_a_jsonl_of_numbers_is_one_line_from_the_command(relu_checkpoint, tmp_path, capsys):
    (tmp_path / "numbers.jsonl").write_text('{"text": 5}\n')
    code, err = run_cli(capsys, "sparsity", relu_checkpoint, "--data", tmp_path / "numbers.jsonl", "--block-size", "32")
    assert_one_line_error(code, err, "line 1: 'text' must be a string, got int")


@pytest.mark.parametrize("key, value", [("rms_norm_eps", "NaN"), ("rms_norm_eps", "Infinity"),
                                        ("hidden_act", '"fatrelu_nan"'), ("rope_theta", "-Infinity")])
def test_a_non_finite_config_value_is_refused(relu_checkpoint, tmp_path, capsys, key, value):
    import shutil

    model = shutil.copytree(relu_checkpoint, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config[key] = "PLACEHOLDER"
    (model / "config.json").write_text(json.dumps(config).replace('"PLACEHOLDER"', value))
    code, err = run_cli(capsys, "sparsity", model, "--data", SAMPLE_TEXT, "--block-size", "32",
                        "--output", tmp_path / "s.json")
    assert_one_line_error(code, err, "config.json", f"'{key}'", "not a finite number")
    assert not (tmp_path / "s.json").exists()


def test_a_measurement_that_comes_out_nan_is_an_error_not_a_row(relu_checkpoint, tmp_path, capsys):
    """Weights holding NaN make every logit NaN: the perplexity is NaN, which is an error, and no JSON is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = shutil.copytree(relu_checkpoint, tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"][:] = math.nan
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(capsys, "sparsity", model, "--data", SAMPLE_TEXT, "--block-size", "32", "--max-tokens", "64",
                        "--output", tmp_path / "s.json")
    assert_one_line_error(code, err, "the sparsity run of", "came out NaN or infinite")
    assert not (tmp_path / "s.json").exists()


def test_the_json_writer_never_writes_a_bare_nan():
    from relufy.checks import json_text
    from relufy.errors import ResultError

    with pytest.raises(ResultError, match=r"'dense.per_layer\[1\]' came out NaN"):
        json_text({"dense": {"per_layer": [0.5, math.nan]}}, "m.json")
    text = json_text({"a": [1.0, {"b": None}]}, "m.json")
    assert json.loads(text) == {"a": [1.0, {"b": None}]}


def test_disk_full_during_a_gguf_conversion_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as SafetensorError, which is no OSError."""
    import transformers.modeling_utils
    from safetensors import SafetensorError
    from tiny_models import save_tiny_gguf

    gguf = save_tiny_gguf(tmp_path / "tiny.gguf", SAMPLE_TEXT)

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    code, err = run_cli(capsys, "convert", gguf, tmp_path / "out")
    assert_one_line_error(code, err, "relufy convert: error: no space left on the device")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.relufy-lock", "tiny.gguf"]  # the lock file stays, empty


@pytest.mark.parametrize("argv", [["convert", "a", "b", "--dtype", "float8"], ["sparsity", "m", "--data", "d",
                                                                                 "--block-size", "x"], ["nope"]])
def test_a_usage_error_is_one_line_too(capsys, argv):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("relufy") and "--help" in err, err
