"""`relufy matched`: per-layer magnitude thresholds reach the target zero-ratio, and the command
measures the thresholded model (perplexity, lm-eval with the probe) into one JSON."""

import json
import math

import pytest
import torch
from conftest import SAMPLE_TEXT
from tiny_models import build_tiny_model, save_tiny_checkpoint, tiny_tokenizer

from relufy.cett import NeuronMask, thresholded_perplexity
from relufy.cli import main
from relufy.matched import MatchedConfig, calibrate, calibrate_uniform, magnitude_quantile, matched_sparsity

BLOCK = 64
SMALL = ["--heldout-tokens", "512", "--calibration-tokens", "512", "--block-size", "64", "--batch-size", "4"]


@pytest.fixture(scope="module")
def silu_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("silu") / "tiny-silu", SAMPLE_TEXT)


@pytest.fixture(scope="module")
def token_blocks():
    ids = torch.tensor(tiny_tokenizer(SAMPLE_TEXT)(SAMPLE_TEXT.read_text())["input_ids"])
    return ids[: 16 * BLOCK].reshape(-1, BLOCK)


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_calibration_reaches_the_target_in_every_layer_of_the_calibration_text(token_blocks, act):
    model = build_tiny_model("llama", hidden_act=act, num_hidden_layers=3)
    for target in (0.6, 0.9):
        thresholds = calibrate(model, token_blocks, target, batch_size=8)
        _, per_layer = thresholded_perplexity(model, token_blocks, NeuronMask(model), thresholds)
        assert len(per_layer) == 3
        for reached in per_layer:  # layer by layer, so thresholding early layers does not move the later ones
            assert target - 1e-6 <= reached <= target + 0.01


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_one_threshold_for_every_layer_reaches_the_target_on_average(token_blocks, act):
    """The uniform threshold is one number whose zero-ratio, averaged over the layers, is the target; the
    layers themselves spread around it (the point of calibrating them one by one)."""
    model = build_tiny_model("llama", hidden_act=act, num_hidden_layers=3)
    threshold = calibrate_uniform(model, token_blocks, 0.8, batch_size=8)
    _, per_layer = thresholded_perplexity(model, token_blocks, NeuronMask(model), [threshold] * 3)
    assert threshold > 0 and sum(per_layer) / 3 == pytest.approx(0.8, abs=2e-3)
    _, dense = thresholded_perplexity(model, token_blocks, NeuronMask(model), [0.0] * 3)
    if act == "relu":  # a target below the model's own zeros needs no threshold
        assert calibrate_uniform(model, token_blocks, min(dense) * 0.9, batch_size=8) == 0.0


def test_quantile_counts_exact_zeros_and_keeps_threshold_zero_when_already_sparse():
    x1 = torch.tensor([0.0, 0.0, 0.0, -0.5, 0.2, 0.1, 0.0, 0.3])
    assert magnitude_quantile(x1, 0.5) == 0.0  # four exact zeros already make half
    assert magnitude_quantile(x1, 0.75) == pytest.approx(0.2)  # six of eight at or below 0.2
    assert magnitude_quantile(x1, 0.99) == pytest.approx(0.5)


def test_silu_model_thresholded_to_half_has_half_zeros_and_a_finite_perplexity(silu_checkpoint, tmp_path):
    config = MatchedConfig(targets=(0.5,), heldout_tokens=512, calibration_tokens=512, block_size=BLOCK,
                           batch_size=4, run_suite=False)
    result = matched_sparsity(str(silu_checkpoint), tmp_path / "m.json", config)
    assert result["dense"]["zero_ratio"] == 0.0  # SiLU has no exact zeros of its own
    entry = result["targets"][0]
    assert entry["calibration_zero_ratio"] == pytest.approx(0.5, abs=0.01)
    assert entry["zero_ratio"] == pytest.approx(0.5, abs=0.05)  # the perplexity text is other text
    assert math.isfinite(entry["ppl"]) and entry["ppl"] > 1
    assert len(entry["thresholds"]) == 2 and all(t > 0 for t in entry["thresholds"])
    assert "lm_eval" not in entry
    assert json.loads((tmp_path / "m.json").read_text())["targets"][0]["ppl"] == pytest.approx(entry["ppl"])


def test_uniform_gives_every_layer_one_threshold_and_says_so_in_the_table(silu_checkpoint, tmp_path, capsys):
    out = tmp_path / "uniform.json"
    assert main(["matched", str(silu_checkpoint), "--target", "0.7", "--uniform", "--no-suite", "-o", str(out),
                 *SMALL]) == 0
    result = json.loads(out.read_text())
    entry = result["targets"][0]
    assert result["settings"]["uniform"] is True and len(set(entry["thresholds"])) == 1 and entry["thresholds"][0] > 0
    assert entry["calibration_zero_ratio"] == pytest.approx(0.7, abs=2e-3)
    assert "| tiny-silu (one threshold) | 70.00% |" in capsys.readouterr().out


def test_cli_writes_json_and_markdown_and_refuses_to_overwrite(silu_checkpoint, tmp_path, capsys):
    out, markdown = tmp_path / "matched.json", tmp_path / "matched.md"
    argv = ["matched", str(silu_checkpoint), "--target", "0.5,0.8", "-o", str(out), "--markdown", str(markdown),
            "--tasks", "relufy_dictionary", "--limit", "2", *SMALL]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [entry["target"] for entry in result["targets"]] == [0.5, 0.8]
    for entry in result["targets"]:  # the probe counted the thresholded x1 on lm-eval's tokens
        assert entry["sparsity"]["overall"] == pytest.approx(entry["target"], abs=0.1)
        assert "relufy_dictionary" in entry["lm_eval"]["results"]
    assert markdown.read_text().count("| tiny-silu |") == 2
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass --force" in err


@pytest.mark.parametrize("target", ["1.5", "0", "abc"])
def test_target_outside_zero_one_is_one_line_error(silu_checkpoint, tmp_path, capsys, target):
    assert main(["matched", str(silu_checkpoint), "--target", target, "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relufy matched: error: --target") and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_a_limit_that_is_not_positive_is_one_line_error(silu_checkpoint, tmp_path, capsys):
    assert main(["matched", str(silu_checkpoint), "--target", "0.5", "-o", str(tmp_path / "x.json"),
                 "--limit", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relufy matched: error: --limit must be a finite number in (0, ") and err.count("\n") == 1


def test_missing_model_is_one_line_error(tmp_path, capsys):
    assert main(["matched", str(tmp_path / "nope"), "--target", "0.9", "-o", str(tmp_path / "x.json")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("relufy matched: error:") and "does not exist" in err and err.count("\n") == 1


def test_too_little_heldout_text_for_separate_calibration_blocks_is_refused(silu_checkpoint, tmp_path, capsys):
    heldout = tmp_path / "short.txt"
    heldout.write_text(SAMPLE_TEXT.read_text()[:1000])
    assert main(["matched", str(silu_checkpoint), "--target", "0.9", "-o", str(tmp_path / "x.json"), "--heldout",
                 str(heldout), "--no-suite", *SMALL]) == 2
    assert "separate ones" in capsys.readouterr().err


def test_the_cli_module_imports_no_torch():
    import subprocess
    import sys

    script = "import sys, relufy.cli; assert 'torch' not in sys.modules and 'relufy.matched' not in sys.modules"
    subprocess.run([sys.executable, "-c", script], check=True)
