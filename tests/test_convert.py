"""Conversion of every mapped architecture: outputs match a hand-written reference, weights stay untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SAMPLE_TEXT
from tiny_models import CONFIGS, VOCAB, build_tiny_model, save_tiny_checkpoint, save_tiny_model

import relufy
from relufy.activations import make_activation, module_class
from relufy.architectures import architecture_for, load_map
from relufy.convert import convert_checkpoint
from relufy.architectures import ffn_modules

REFERENCE = {
    "relu": lambda x, p: x.clamp_min(0),
    "relu2": lambda x, p: x.clamp_min(0) ** 2,
    "fatrelu": lambda x, p: torch.where(x >= p, x, torch.zeros_like(x)),
    "shifted_relu": lambda x, p: (x - p).clamp_min(0),
}
VARIANTS = [("relu", None), ("relu2", None), ("fatrelu", 0.05), ("shifted_relu", 0.1)]

relufy.register_activations()  # this process loads fatrelu / shifted_relu outputs without their remote code


def reference_logits(model, act, param, input_ids):
    """Logits of the original model with every FFN recomputed by hand with the new activation."""
    arch = architecture_for(model.config.model_type)
    originals = {}
    for ffn in ffn_modules(model, arch):
        def forward(x, ffn=ffn):
            if arch.gate_up:
                gate, up = getattr(ffn, arch.gate_up)(x).chunk(2, dim=-1)
                x1 = REFERENCE[act](gate, param) * up
            elif arch.gated:
                x1 = REFERENCE[act](getattr(ffn, arch.gate)(x), param) * getattr(ffn, arch.up)(x)
            else:
                x1 = REFERENCE[act](getattr(ffn, arch.up)(x), param)
            return getattr(ffn, arch.down)(x1)
        originals[ffn] = ffn.forward
        ffn.forward = forward
    try:
        with torch.no_grad():
            return model(input_ids=input_ids).logits
    finally:
        for ffn, forward in originals.items():
            ffn.forward = forward


def file_digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_map_covers_the_architectures_the_issue_asks_for():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt2", "falcon"}
    assert required <= set(load_map())
    assert set(load_map()) == set(CONFIGS), "every mapped architecture needs a tiny test config"


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_relu_conversion_matches_hand_computed_reference(tmp_path, model_type):
    src = save_tiny_model(model_type, tmp_path / "src")
    out = convert_checkpoint(src, tmp_path / "out", make_activation("relu"))
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = converted(input_ids=input_ids).logits
        before = original(input_ids=input_ids).logits
    torch.testing.assert_close(got, reference_logits(original, "relu", None, input_ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, before), "the activation swap must change the outputs"
    assert file_digest(out / "model.safetensors") == file_digest(src / "model.safetensors")


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "gemma2"])
@pytest.mark.parametrize("act,param", VARIANTS[1:])
def test_variants_match_hand_computed_reference(tmp_path, model_type, act, param):
    src = save_tiny_model(model_type, tmp_path / "src")
    activation = make_activation(act, threshold=param if act == "fatrelu" else None,
                                 shift=param if act == "shifted_relu" else None)
    out = convert_checkpoint(src, tmp_path / "out", activation)
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    input_ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = converted(input_ids=input_ids).logits
    torch.testing.assert_close(got, reference_logits(original, act, param, input_ids), rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_keeps_shards_and_index_byte_identical(tmp_path):
    src = tmp_path / "src"
    build_tiny_model("llama").save_pretrained(src, max_shard_size="20KB")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1 and (src / "model.safetensors.index.json").is_file()
    before = {p.name: file_digest(p) for p in src.iterdir()}
    out = convert_checkpoint(src, tmp_path / "out", make_activation("relu"))
    assert {p.name: file_digest(p) for p in src.iterdir()} == before, "SRC must never change"
    for name in shards + ["model.safetensors.index.json"]:
        assert file_digest(out / name) == before[name]
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "relu"
    assert config["relufy"]["original_activation"] == "silu"
    assert config["relufy"]["source"] == str(src.resolve())


def test_link_mode_hard_links_weights(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    out = convert_checkpoint(src, tmp_path / "out", make_activation("relu"), link=True)
    assert (out / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino
    assert (out / "config.json").stat().st_ino != (src / "config.json").stat().st_ino


def test_tokenizer_and_generation_config_come_along(tmp_path):
    src = save_tiny_checkpoint("llama", tmp_path / "src", SAMPLE_TEXT)
    out = convert_checkpoint(src, tmp_path / "out", make_activation("relu"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert file_digest(out / name) == file_digest(src / name)


CLEAN_LOAD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "remote").eval()
    assert "relufy" not in sys.modules, "relufy must not be imported"
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[3])
""")


@pytest.mark.parametrize("act,param,mode", [("relu", None, "plain"), ("relu2", None, "plain"),
                                            ("fatrelu", 0.05, "remote"), ("shifted_relu", 0.1, "remote")])
def test_output_loads_in_a_clean_process_without_relufy(tmp_path, act, param, mode):
    src = save_tiny_model("llama", tmp_path / "src")
    activation = make_activation(act, threshold=param if act == "fatrelu" else None,
                                 shift=param if act == "shifted_relu" else None)
    out = convert_checkpoint(src, tmp_path / "out", activation)
    logits_file = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(out), mode, str(logits_file)], check=True,
                   cwd=tmp_path)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(src).eval()
    expected = reference_logits(original, act, param, torch.arange(12).reshape(1, 12))
    torch.testing.assert_close(torch.load(logits_file, weights_only=True), expected, rtol=1e-5, atol=1e-5)


def test_fatrelu_output_loads_after_register_activations_and_no_remote_code(tmp_path):
    src = save_tiny_model("qwen3", tmp_path / "src")
    out = convert_checkpoint(src, tmp_path / "out", make_activation("fatrelu", threshold=0.02))
    from transformers import AutoModelForCausalLM

    relufy.register_activations()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__module__.startswith("transformers.models.qwen3")
    assert isinstance(model.model.layers[0].mlp.act_fn, module_class("fatrelu"))
    assert model.model.layers[0].mlp.act_fn.threshold == 0.02


def test_force_replaces_existing_output_and_converts_relu_again(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    out = convert_checkpoint(src, tmp_path / "out", make_activation("relu"))
    (out / "stale.txt").write_text("old")
    convert_checkpoint(src, out, make_activation("relu2"), force=True)
    assert not (out / "stale.txt").exists()
    again = convert_checkpoint(out, tmp_path / "again", make_activation("relu2"), force=True)
    assert json.loads((again / "config.json").read_text())["hidden_act"] == "relu2"


def test_relu_model_can_be_threshold_shifted(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src", hidden_act="relu")
    out = convert_checkpoint(src, tmp_path / "out", make_activation("fatrelu", threshold=0.01))
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "fatrelu_0.01"
    assert config["relufy"]["original_activation"] == "relu"
    assert "auto_map" in config and (out / "modeling_relufy.py").is_file()


def test_hub_id_is_fetched_with_huggingface_hub_then_converted(tmp_path, monkeypatch):
    cache = save_tiny_model("mistral", tmp_path / "hub-cache" / "snapshot")
    asked = []

    def fake_snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(cache)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = convert_checkpoint("someorg/tiny-mistral", tmp_path / "out", make_activation("relu"))
    assert asked == ["someorg/tiny-mistral"]
    assert json.loads((out / "config.json").read_text())["relufy"]["source"] == "someorg/tiny-mistral"


def test_unreachable_hub_id_fails_with_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from relufy.cli import main

    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["convert", "someorg/missing-model", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "someorg/missing-model" in err
    assert "is not a local directory or file" in err  # a mistyped local path is not only a network problem
    assert list(tmp_path.iterdir()) == []


def test_subdirectories_such_as_training_checkpoints_are_left_out(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    (src / "checkpoint-100").mkdir()
    (src / "checkpoint-100" / "optimizer.pt").write_bytes(b"x" * 1000)
    out = convert_checkpoint(src, tmp_path / "out", make_activation("relu"))
    assert not (out / "checkpoint-100").exists()
    assert (out / "model.safetensors").is_file()


def test_provenance_round_trips_and_keeps_keys_it_does_not_know(tmp_path):
    """read_provenance/update_provenance are the one reader and writer of the `relufy` key: a change to one
    field leaves the others, the rest of config.json, and keys a newer relufy wrote as they were."""
    from relufy.checkpoint import Provenance, read_config, read_provenance, update_config, update_provenance

    src = save_tiny_model("llama", tmp_path / "src")
    out = convert_checkpoint(src, tmp_path / "out", make_activation("relu"))
    provenance = read_provenance(out)
    assert (provenance.source, provenance.original_activation, provenance.activation) == (
        str(src.resolve()), "silu", "relu")
    assert not provenance.dequantized and provenance.training is None
    update_config(out, lambda config: config["relufy"].update(future_key=[1, 2]))
    update_provenance(out, training={"steps": 3})
    config = read_config(out)
    assert config["relufy"]["future_key"] == [1, 2] and config["relufy"]["training"] == {"steps": 3}
    assert config["relufy"]["source"] == str(src.resolve()) and config["hidden_act"] == "relu"
    assert read_provenance(tmp_path / "missing") == Provenance() and not read_provenance(src)


def test_a_conversion_of_a_relufy_checkpoint_carries_its_record_and_the_untouched_activation(tmp_path):
    """Trained and shifted to fatrelu_0.028, then converted with per-layer thresholds: the record still names the
    untouched model's activation (not the shifted one) and keeps the training, the shift, the dequantization
    and keys a newer relufy wrote; source, activation and version are the new conversion's."""
    from relufy.checkpoint import read_provenance, update_config
    from relufy.per_layer import PER_LAYER

    src = save_tiny_model("llama", tmp_path / "src")
    plain = convert_checkpoint(src, tmp_path / "relu", make_activation("relu"))
    started = json.loads((plain / "config.json").read_text())["relufy"]  # a plain model starts the record
    version = started.pop("relufy_version")
    assert started == {"source": str(src.resolve()), "original_activation": "silu", "activation": "relu"}
    training, shift = {"steps": 3, "stages": [{"lambda": 0.01}]}, {"threshold": 0.028, "perplexity_after": 9.5}

    def trained_and_shifted(config: dict) -> None:
        config["hidden_act"] = "fatrelu_0.028"
        config["relufy"].update(activation="fatrelu_0.028", dequantized=True, training=training,
                                threshold_shift=shift, future_key=[1])

    update_config(plain, trained_and_shifted)
    out = convert_checkpoint(plain, tmp_path / "layers", PER_LAYER, layer_thresholds=[0.01, 0.03])
    provenance = read_provenance(out)
    assert (provenance.source, provenance.original_activation, provenance.activation) == (
        str(plain.resolve()), "silu", "fatrelu")
    assert provenance.training == training and provenance.threshold_shift == shift and provenance.dequantized
    assert provenance.extra == {"future_key": [1]} and provenance.relufy_version == version
