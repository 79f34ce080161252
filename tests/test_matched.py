"""`relufy matched`: per-layer magnitude thresholds reach the target zero-ratio, thresholds on the
activation are a FATReLU model's, and the command measures the thresholded model (perplexity, lm-eval
with the probe) into one JSON."""

import json
import math

import pytest
import torch
from conftest import SAMPLE_TEXT
from tiny_models import build_tiny_model, save_tiny_checkpoint, tiny_tokenizer

from relufy.activations import module_class
from relufy.architectures import activation_modules
from relufy.cett import thresholded_perplexity
from relufy.cli import main
from relufy.matched import (MatchedConfig, calibrate, calibrate_uniform, magnitude_quantile, matched_sparsity,
                            strict_quantile, threshold_mask)
from relufy.scores import score_stderr

SITES = ["activation", "x1"]

BLOCK = 64
SMALL = ["--heldout-tokens", "512", "--calibration-tokens", "512", "--block-size", "64", "--batch-size", "4"]


@pytest.fixture(scope="module")
def silu_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("silu") / "tiny-silu", SAMPLE_TEXT)


@pytest.fixture(scope="module")
def token_blocks():
    ids = torch.tensor(tiny_tokenizer(SAMPLE_TEXT)(SAMPLE_TEXT.read_text())["input_ids"])
    return ids[: 16 * BLOCK].reshape(-1, BLOCK)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_calibration_reaches_the_target_in_every_layer_of_the_calibration_text(token_blocks, act, site):
    model = build_tiny_model("llama", hidden_act=act, num_hidden_layers=3)
    for target in (0.6, 0.9):
        thresholds = calibrate(model, token_blocks, target, batch_size=8, threshold_on=site)
        _, per_layer = thresholded_perplexity(model, token_blocks, threshold_mask(model, site), thresholds)
        assert len(per_layer) == 3
        for reached in per_layer:  # layer by layer, so thresholding early layers does not move the later ones
            assert target - 1e-6 <= reached <= target + 0.01


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_one_threshold_for_every_layer_reaches_the_target_on_average(token_blocks, act, site):
    """The uniform threshold is one number whose zero-ratio, averaged over the layers, is the target; the
    layers themselves spread around it (the point of calibrating them one by one)."""
    model = build_tiny_model("llama", hidden_act=act, num_hidden_layers=3)
    threshold = calibrate_uniform(model, token_blocks, 0.8, batch_size=8, threshold_on=site)
    mask = threshold_mask(model, site)
    _, per_layer = thresholded_perplexity(model, token_blocks, mask, [threshold] * 3)
    assert threshold > 0 and sum(per_layer) / 3 == pytest.approx(0.8, abs=2e-3)
    _, dense = thresholded_perplexity(model, token_blocks, mask, [0.0] * 3)
    if act == "relu":  # a target below the model's own zeros needs no threshold
        assert calibrate_uniform(model, token_blocks, min(dense) * 0.9, batch_size=8, threshold_on=site) == 0.0


def test_activation_thresholds_are_the_fatrelu_model_with_those_thresholds(token_blocks):
    """On a ReLU model, the thresholded model `relufy matched` measures is exactly the model whose layer l
    runs FATReLU(t_l): same loss, same zeros. So what it measures can be deployed as it is."""
    model = build_tiny_model("llama", hidden_act="relu", num_hidden_layers=3)
    thresholds = calibrate(model, token_blocks, 0.9, batch_size=8)
    ppl, per_layer = thresholded_perplexity(model, token_blocks, threshold_mask(model), thresholds)
    assert all(t > 0 for t in thresholds)
    fatrelu = build_tiny_model("llama", hidden_act="relu", num_hidden_layers=3)
    for ffn, threshold in zip(fatrelu.model.layers, thresholds):
        ffn.mlp.act_fn = module_class("fatrelu")(threshold)
    deployed_ppl, deployed_zeros = thresholded_perplexity(fatrelu, token_blocks, threshold_mask(fatrelu), [0.0] * 3)
    assert deployed_ppl == ppl and deployed_zeros == per_layer


def test_x1_thresholds_are_not_a_fatrelu_model(token_blocks):
    """x1 = relu(gate) * up: thresholding it ranks neurons by the product, so at the same zero-ratio it keeps
    other neurons than a threshold on the activation does, and no FATReLU threshold reproduces it."""
    model = build_tiny_model("llama", hidden_act="relu", num_hidden_layers=3)
    on_x1 = calibrate(model, token_blocks, 0.9, batch_size=8, threshold_on="x1")
    on_activation = calibrate(model, token_blocks, 0.9, batch_size=8)
    ppl_x1, _ = thresholded_perplexity(model, token_blocks, threshold_mask(model, "x1"), on_x1)
    ppl_activation, _ = thresholded_perplexity(model, token_blocks, threshold_mask(model), on_activation)
    assert on_x1 != on_activation and ppl_x1 != ppl_activation


def test_the_activation_mask_hooks_each_ffns_activation_module():
    model = build_tiny_model("llama", hidden_act="relu", num_hidden_layers=3)
    assert threshold_mask(model).modules == activation_modules(model) == [layer.mlp.act_fn for layer in model.model.layers]


def test_strict_quantile_is_fatrelus_threshold_for_the_target():
    """FATReLU drops s < t: t is the magnitude just above the k-th smallest, so exactly k values fall below."""
    s = torch.tensor([0.0, 0.0, 0.1, 0.2, 0.2, 0.3, 0.5, 0.7])
    assert strict_quantile(s, 0.25) == 0.0  # the two exact zeros are a quarter already
    assert strict_quantile(s, 0.5) == pytest.approx(0.3)  # 0, 0, 0.1, 0.2, 0.2 fall below 0.3: 5 of 8 >= half
    assert strict_quantile(s, 0.3) == pytest.approx(0.2)  # 0, 0, 0.1 below 0.2: 3 of 8 >= 0.3
    assert strict_quantile(-s, 0.3) == pytest.approx(0.2)  # magnitudes, as CATS thresholds a SiLU output
    assert strict_quantile(s, 0.99) > 0.7  # above the largest: every value falls below it


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


def test_threshold_on_x1_is_recorded_and_named_in_the_table(silu_checkpoint, tmp_path, capsys):
    out = tmp_path / "x1.json"
    assert main(["matched", str(silu_checkpoint), "-t", "0.7", "--threshold-on", "x1", "--no-suite", "-o", str(out),
                 *SMALL]) == 0
    assert json.loads(out.read_text())["settings"]["threshold_on"] == "x1"
    assert "| tiny-silu (x1 thresholds) | 70.00% |" in capsys.readouterr().out


def test_cli_writes_json_and_markdown_and_refuses_to_overwrite(silu_checkpoint, tmp_path, capsys):
    out, markdown = tmp_path / "matched.json", tmp_path / "matched.md"
    argv = ["matched", str(silu_checkpoint), "--target", "0.5,0.8", "-o", str(out), "--markdown", str(markdown),
            "--suite", "offline", "--limit", "2", *SMALL]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [entry["target"] for entry in result["targets"]] == [0.5, 0.8]
    for entry in result["targets"]:  # the probe counted the thresholded x1 on lm-eval's tokens
        assert entry["sparsity"]["overall"] == pytest.approx(entry["target"], abs=0.1)
        assert "relufy_dictionary" in entry["lm_eval"]["results"]
        errors = [score_stderr(entry["lm_eval"], task) for task in ("relufy_dictionary", "relufy_lastword")]
        assert entry["scores_stderr"]["average"] == pytest.approx(math.hypot(*errors) / 2)
    assert markdown.read_text().count("| tiny-silu |") == 2
    assert markdown.read_text().count(" ± ") == 2  # the suite average with its standard error
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
