"""The sparsity probe counts exactly what a manual count of x1 gives, and never changes outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE_TEXT
from tiny_models import VOCAB, build_tiny_model, manual_x1, save_tiny_checkpoint

from relufy.cli import main
from relufy.probe import SparsityProbe


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt_neox"])
def test_zero_ratio_equals_manual_count(model_type):
    model = build_tiny_model(model_type, hidden_act="relu") if model_type != "gpt_neox" else \
        build_tiny_model(model_type, hidden_act="relu")
    input_ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    expected = [float((x1 == 0).float().mean()) for x1 in manual_x1(model, input_ids)]
    with SparsityProbe.for_measurement(model) as probe, torch.no_grad():
        model(input_ids=input_ids)
    summary = probe.summary()
    assert summary["per_layer"] == pytest.approx(expected, abs=1e-7)
    assert summary["overall"] == pytest.approx(sum(expected) / len(expected))
    assert summary["tokens"] == 3 * 16
    assert 0.2 < summary["overall"] < 0.9, "a random ReLU model has roughly half its x1 at zero"


def test_threshold_ratio_counts_small_magnitudes_for_any_activation():
    model = build_tiny_model("llama")  # SiLU: no exact zeros
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    x1s = manual_x1(model, input_ids)
    threshold = float(torch.cat([x.flatten() for x in x1s]).abs().median())
    with SparsityProbe.for_measurement(model, threshold=threshold) as probe, torch.no_grad():
        model(input_ids=input_ids)
    summary = probe.summary()
    assert summary["overall"] == 0.0
    expected = [float((x.abs() <= threshold).float().mean()) for x in x1s]
    assert summary["per_layer_below_threshold"] == pytest.approx(expected, abs=1e-7)


def test_token_mask_excludes_padding():
    model = build_tiny_model("llama", hidden_act="relu")
    input_ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    x1s = manual_x1(model, input_ids)
    expected = [float((x[mask] == 0).float().mean()) for x in x1s]
    with SparsityProbe.for_measurement(model, token_mask=mask) as probe, torch.no_grad():
        model(input_ids=input_ids)
    assert probe.summary()["per_layer"] == pytest.approx(expected, abs=1e-7)
    assert probe.tokens == 16


def test_probe_does_not_change_outputs_and_detaches_cleanly():
    model = build_tiny_model("gemma2", hidden_activation="relu")
    input_ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        with SparsityProbe.for_training(model), SparsityProbe.for_sampling(model):
            during = model(input_ids=input_ids).logits
        after = model(input_ids=input_ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_sparsity_command_writes_json(tmp_path, capsys):
    src = save_tiny_checkpoint("llama", tmp_path / "model", SAMPLE_TEXT, hidden_act="relu")
    out = tmp_path / "sparsity.json"
    code = main(["sparsity", str(src), "--data", str(SAMPLE_TEXT), "--max-tokens", "256", "--block-size", "32",
                 "--threshold", "0.01", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["overall"] <= 1.0
    assert len(result["per_layer"]) == 2
    assert result["tokens"] == 256
    assert result["activation"] == "relu"
    assert result["overall_below_threshold"] >= result["overall"]
    assert "zero-ratio" in capsys.readouterr().out


@pytest.mark.parametrize("argv,mentions", [
    (["--max-tokens", "0"], "--max-tokens"),
    (["--threshold", "-1"], "--threshold"),
    (["--block-size", "100000"], "context of 64 tokens"),
])
def test_sparsity_command_bad_input(tmp_path, capsys, argv, mentions):
    src = save_tiny_checkpoint("llama", tmp_path / "model", SAMPLE_TEXT, hidden_act="relu")
    capsys.readouterr()
    code = main(["sparsity", str(src), "--data", str(SAMPLE_TEXT), "--output", str(tmp_path / "s.json"), *argv])
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert code != 0 and last_line.startswith("relufy sparsity: error:") and mentions in last_line
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("text,block_size,mentions", [
    ("\n\n   \n", "32", "holds no text"),
    ("a few words\n", "64", "shorter than one block"),
])
def test_sparsity_command_on_too_little_data(tmp_path, capsys, text, block_size, mentions):
    src = save_tiny_checkpoint("llama", tmp_path / "model", SAMPLE_TEXT, hidden_act="relu")
    data = tmp_path / "data.txt"
    data.write_text(text)
    capsys.readouterr()
    code = main(["sparsity", str(src), "--data", str(data), "--block-size", block_size])
    err = capsys.readouterr().err.strip()
    assert code != 0 and mentions in err
