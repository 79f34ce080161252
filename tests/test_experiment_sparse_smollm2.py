"""experiments/sparse-smollm2/check_tokens.py on a tiny checkpoint, on CPU under Triton's interpreter.

A SiLU checkpoint is converted first; a ReLU one (what `relufy train` writes) is checked as it is.
In float32 the dense and sparse greedy tokens must agree on every shipped prompt, so the script exits 0,
and its JSON carries the dense margins and the dense-sparse logit noise. Where tokens differ, the margin
at the first difference decides between a near-tie and a bug (`compare`, on hand-made scores).
"""

from __future__ import annotations

import json

import pytest

from conftest import load_script

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def check_tokens():
    return load_script("experiments/sparse-smollm2/check_tokens.py", "check_tokens")


@pytest.mark.parametrize("base", ["silu_base", "relu_checkpoint"])
def test_check_tokens_finds_identical_greedy_tokens(tmp_path, check_tokens, base, request, capsys):
    output = tmp_path / "tokens.json"
    code = check_tokens.main(["--model", str(request.getfixturevalue(base)), "--device", "cpu", "--dtype", "float32",
                              "--new-tokens", "3", "--output", str(output)])
    result = json.loads(output.read_text())
    assert code == 0 and result["ok"] and result["all_identical"] and result["sparse_ffns"] == 2
    assert len(result["prompts"]) == len(check_tokens.PROMPTS) >= 8
    assert result["identical_prompts"] == len(result["prompts"]) and result["min_matching_tokens"] == 3
    for row in result["prompts"]:
        assert row["new_tokens"] == 3 and row["first_difference"] is None and "at_difference" not in row
        assert row["min_margin"] >= 0 and 0 <= row["min_margin_position"] < 3
        assert row["max_logit_difference"] < result["tolerance"]  # float32: the kernels add rounding noise only
        assert row["dense_text"] == row["sparse_text"]
    assert "relufy_output" in result and result["tolerance"] == check_tokens.DEFAULT_TOLERANCE["float32"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"{len(result['prompts'])}/")


def test_check_tokens_keeps_an_existing_output(tmp_path, check_tokens, relu_checkpoint, capsys):
    """An output relufy did not write is never replaced, --force or not; the refusal is one line, exit 2."""
    output = tmp_path / "tokens.json"
    output.write_text("mine\n")
    code = check_tokens.main(["--model", str(relu_checkpoint), "--device", "cpu", "--dtype", "float32",
                              "--output", str(output), "--force"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and output.read_text() == "mine\n"
    assert len(err.splitlines()) == 1 and "relufy did not write" in err


def _greedy(check_tokens, tokens, logits):
    import torch

    return check_tokens.Greedy(tokens=torch.tensor(tokens), scores=torch.tensor(logits, dtype=torch.float32))


def test_compare_tells_a_near_tie_from_a_bug(check_tokens):
    dense = _greedy(check_tokens, [0, 1, 2], [[5.0, 1.0, 0.0], [0.0, 3.0, 2.9], [0.0, 0.0, 9.0]])
    near = _greedy(check_tokens, [0, 2, 1], [[5.0, 1.0, 0.0], [0.0, 2.95, 3.0], [0.0, 9.0, 0.0]])
    row = check_tokens.compare(dense, near, tolerance=0.5)
    assert not row["identical"] and row["first_difference"] == 1 and row["matching_tokens"] == 1
    at = row["at_difference"]
    assert at["near_tie"] and at["dense_gap"] == pytest.approx(0.1) and at["dense_top2_margin"] == pytest.approx(0.1)
    assert at["sparse_top2_margin"] == pytest.approx(0.05) and at["logit_difference"] == pytest.approx(0.1)
    assert row["min_margin"] == pytest.approx(0.1) and row["min_margin_position"] == 1
    wide = _greedy(check_tokens, [0, 0, 0], [[5.0, 1.0, 0.0], [9.0, 3.0, 2.9], [9.0, 0.0, 0.0]])
    at = check_tokens.compare(dense, wide, tolerance=0.5)["at_difference"]
    assert not at["near_tie"] and at["dense_gap"] == pytest.approx(3.0) and at["dense_top2_margin"] == pytest.approx(0.1)


def test_compare_of_identical_decodes_reports_the_closest_call(check_tokens):
    import torch

    dense = _greedy(check_tokens, [0, 1], [[2.0, 1.5, float("-inf")], [0.0, 4.0, float("-inf")]])
    sparse = _greedy(check_tokens, [0, 1], [[2.0, 1.25, float("-inf")], [0.0, 4.0, float("-inf")]])
    row = check_tokens.compare(dense, sparse, tolerance=0.5)
    assert row["identical"] and row["first_difference"] is None and row["matching_tokens"] == 2
    assert row["min_margin"] == pytest.approx(0.5) and row["min_margin_position"] == 0
    assert row["max_logit_difference"] == pytest.approx(0.25) and torch.isfinite(torch.tensor(row["max_logit_difference"]))
