"""experiments/sparse-smollm2/check_tokens.py on a tiny checkpoint, on CPU under Triton's interpreter.

A SiLU checkpoint is converted first; a ReLU one (what `relufy train` writes) is checked as it is.
In float32 the dense and sparse greedy tokens must agree, so the script exits 0 and says so.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from tiny_models import save_tiny_checkpoint

from conftest import REPO, SAMPLE_TEXT

pytest.importorskip("triton")


def _check_tokens():
    spec = importlib.util.spec_from_file_location("check_tokens", REPO / "experiments/sparse-smollm2/check_tokens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("hidden_act", ["silu", "relu"])
def test_check_tokens_finds_identical_greedy_tokens(tmp_path, hidden_act):
    model = save_tiny_checkpoint("llama", tmp_path / f"tiny-{hidden_act}", SAMPLE_TEXT, hidden_act=hidden_act)
    output = tmp_path / "tokens.json"
    code = _check_tokens().main(["--model", str(model), "--device", "cpu", "--dtype", "float32",
                                 "--new-tokens", "3", "--output", str(output)])
    result = json.loads(output.read_text())
    assert code == 0 and result["all_identical"] and result["sparse_ffns"] == 2
    assert all(row["new_tokens"] == 3 for row in result["prompts"])
