"""`relufy publish`: a Hub-ready folder whose card carries the measured results and loads anywhere."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import SAMPLE_TEXT
from tiny_models import save_tiny_checkpoint

from relufy.activations import make_activation
from relufy.cli import main
from relufy.convert import convert_checkpoint
from relufy.errors import DataError, OutputExistsError
from relufy.evaluate import EvalConfig, evaluate_model
from relufy.publish import publish, serve_section


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A SiLU 'original' whose README declares a license, as Hub models do."""
    path = save_tiny_checkpoint("llama", tmp_path_factory.mktemp("src") / "tiny-silu", SAMPLE_TEXT)
    (path / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# tiny\n")
    return path


def _converted_and_evaluated(source, root, activation):
    model = convert_checkpoint(source, root / f"tiny-{activation.config_value}", activation)
    results = evaluate_model(str(model), root / f"eval-{model.name}",
                             EvalConfig(tasks=["relufy_dictionary"], limit=4, ps=()))
    assert results["model_name"] == model.name
    return model, root / f"eval-{model.name}" / "results.json"


@pytest.fixture(scope="module")
def relu(source, tmp_path_factory):
    return _converted_and_evaluated(source, tmp_path_factory.mktemp("relu"), make_activation("relu"))


@pytest.fixture(scope="module")
def fatrelu(source, tmp_path_factory):
    return _converted_and_evaluated(source, tmp_path_factory.mktemp("fat"), make_activation("fatrelu", threshold=0.01))


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])


def _load_in_fresh_process(folder, *, import_relufy: bool, trust_remote_code: bool = False) -> str:
    code = ("import sys\n" + ("import relufy\nrelufy.register_activations()\n" if import_relufy else "") +
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code={trust_remote_code})\n"
            f"tok = AutoTokenizer.from_pretrained({str(folder)!r})\n"
            "ids = tok('The module', return_tensors='pt').input_ids\n"
            "print(model.config.hidden_act, 'relufy' in sys.modules, model(ids).logits.shape[-1])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_card_has_front_matter_with_measured_results_and_carried_license(relu, tmp_path):
    model, results_path = relu
    out = publish(model, results_path, tmp_path / "pub", repo_id="me/tiny-relu", base_model="org/tiny-silu")
    card = (out / "README.md").read_text()
    front = _front_matter(card)
    assert front["license"] == "mit"  # carried from the source README through the conversion provenance
    assert front["base_model"] == "org/tiny-silu"
    assert "relufy" in front["tags"] and "prosparse" in front["tags"]
    index = front["model-index"][0]
    assert index["name"] == "tiny-relu"
    results = json.loads(results_path.read_text())
    accuracy = results["lm_eval"]["results"]["relufy_dictionary"]["acc_norm,none"]
    metrics = {m["type"]: m["value"] for entry in index["results"] for m in entry["metrics"]}
    assert metrics["acc_norm"] == pytest.approx(accuracy * 100, abs=0.01)
    assert metrics["activation_sparsity"] == pytest.approx(results["sparsity"]["overall"] * 100, abs=0.01)
    assert "| relufy_dictionary |" in card and "## How to load" in card and 'from_pretrained("me/tiny-relu")' in card
    assert "## Serve it" in card and "vllm serve me/tiny-relu\n" in card and "llama.cpp" in card
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}


def test_a_checkpoint_converted_from_a_relufy_folder_carries_the_originals_license(relu, tmp_path):
    """Trained, then converted again: the card's license is the first model's, two steps up (`relufy train`
    writes no README, so the trained folder's own provenance must be followed), and the card says which
    activation of the untouched model was replaced and how the weights were trained."""
    from relufy.checkpoint import update_provenance

    model, _ = relu
    trained = shutil.copytree(model, tmp_path / "trained")
    (trained / "README.md").unlink()
    update_provenance(trained, training={"steps": 3})
    again = convert_checkpoint(trained, tmp_path / "tiny-fatrelu-again", make_activation("fatrelu", threshold=0.01))
    evaluate_model(str(again), tmp_path / "eval", EvalConfig(tasks=["relufy_dictionary"], limit=4, ps=()))
    out = publish(again, tmp_path / "eval" / "results.json", tmp_path / "pub")
    card = (out / "README.md").read_text()
    assert _front_matter(card)["license"] == "mit"
    assert "the FFN activation `silu` was replaced by `fatrelu_0.01`" in card
    assert "source: trained\noriginal_activation: silu\nactivation: fatrelu_0.01\ntraining:\n  steps: 3\n" in card


def test_the_card_of_a_chained_checkpoint_names_the_untouched_activation_and_the_training():
    """Trained and shifted to fatrelu_0.028, then converted with per-layer thresholds: the summary names the
    first model's activation, not the shifted one, and the recipe keeps the training and the shift."""
    from relufy.publish import model_card

    provenance = {"source": "prosparse-kd", "original_activation": "silu", "activation": "fatrelu",
                  "relufy_version": "0", "training": {"steps": 7}, "threshold_shift": {"threshold": 0.028}}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "fatrelu",
              "relufy_layer_thresholds": [0.028, 0.03], "relufy": provenance}
    results = {"model": "m", "lm_eval": {"results": {}}, "sparsity": {"overall": 0.9, "per_task": {}, "tokens": 8}}
    card = model_card(results, config, repo_id="me/m", base_model=None, license_id="mit", remote_code=True)
    assert "the FFN activation `silu` was replaced by `fatrelu` (ProSparse" in card
    assert "training:\n  steps: 7\nthreshold_shift:\n  threshold: 0.028\n" in card


def test_serve_section_names_the_plugin_or_the_transformers_backend_and_warns():
    native = "\n".join(serve_section({"architectures": ["Qwen2ForCausalLM"]}, "relu2", "me/m", remote_code=False))
    assert "pip install 'relufy[vllm]'\nvllm serve me/m\n" in native and "--model-impl" not in native
    other = "\n".join(serve_section({"architectures": ["Olmo2ForCausalLM"]}, "fatrelu_0.01", "me/g", remote_code=True))
    assert "vllm serve me/g --model-impl transformers --trust-remote-code" in other
    dense = "\n".join(serve_section({"architectures": ["FalconForCausalLM"]}, "relu", "me/f", remote_code=False))
    assert "vllm serve me/f\n" in dense and "(dense: " in dense and "silently runs GELU in its place" in dense
    for text, activation in ((native, "relu2"), (other, "fatrelu_0.01")):
        assert f"silently run its original activation (SiLU or GELU) instead of `{activation}`" in text
        assert all(engine in text for engine in ("llama.cpp", "Ollama", "MLC LLM", "ExLlama"))


def test_published_relu_folder_loads_with_vanilla_transformers(relu, tmp_path):
    out = publish(*relu, tmp_path / "pub")
    assert _load_in_fresh_process(out, import_relufy=False) == "relu False 384"


def test_published_fatrelu_folder_loads_with_relufy_or_remote_code(fatrelu, tmp_path):
    out = publish(*fatrelu, tmp_path / "pub")
    assert (out / "modeling_relufy.py").is_file()
    assert _load_in_fresh_process(out, import_relufy=True) == "fatrelu_0.01 True 384"
    assert _load_in_fresh_process(out, import_relufy=False, trust_remote_code=True) == "fatrelu_0.01 False 384"
    assert "trust_remote_code=True" in (out / "README.md").read_text()


def test_published_per_layer_folder_says_how_it_loads_and_loads_that_way(source, tmp_path):
    """One FATReLU threshold per layer: the card loads it with trust_remote_code (register_activations alone
    refuses it), and so does a clean process without relufy."""
    from relufy.per_layer import PER_LAYER

    relu = convert_checkpoint(source, tmp_path / "relu", make_activation("relu"))
    model = convert_checkpoint(relu, tmp_path / "tiny-per-layer", PER_LAYER, layer_thresholds=[0.01, 0.03])
    evaluate_model(str(model), tmp_path / "eval", EvalConfig(tasks=["relufy_dictionary"], limit=4, ps=()))
    out = publish(model, tmp_path / "eval" / "results.json", tmp_path / "pub")
    card = (out / "README.md").read_text()
    assert 'from_pretrained("pub", trust_remote_code=True)' in card
    assert "one FATReLU threshold per FFN layer (`relufy_layer_thresholds`" in card
    assert "relufy.register_activations()  #" not in card
    assert _load_in_fresh_process(out, import_relufy=False, trust_remote_code=True) == "fatrelu False 384"


def test_results_of_another_model_are_refused(relu, fatrelu, tmp_path):
    with pytest.raises(DataError, match=r"config_sha256, activation \(relu evaluated, fatrelu_0.01 here\) differ"):
        publish(fatrelu[0], relu[1], tmp_path / "pub")
    assert not (tmp_path / "pub").exists()


def test_a_model_with_the_evaluated_name_but_other_weights_or_activation_is_refused(relu, source, tmp_path):
    model, results_path = relu
    namesake = convert_checkpoint(source, tmp_path / model.name, make_activation("fatrelu", threshold=0.01))
    with pytest.raises(DataError, match="evaluates another model.*activation"):
        publish(namesake, results_path, tmp_path / "pub")
    retrained = tmp_path / "retrained" / model.name  # same config, other weights
    shutil.copytree(model, retrained)
    weights = retrained / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x00\x40"  # the last float (a norm weight, 1.0) becomes 2.0
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r": weights_sha256 differ"):
        publish(retrained, results_path, tmp_path / "pub")
    assert not (tmp_path / "pub").exists()


def test_results_card_and_config_carry_names_not_local_paths(relu, tmp_path):
    model, results_path = relu
    out = publish(model, results_path, tmp_path / "pub")
    local = str(model.parents[1])  # pytest's temporary root: every folder of the fixtures is under it
    for text in ((out / "README.md").read_text(), (out / "config.json").read_text(), results_path.read_text()):
        assert local not in text and sys.prefix not in text
    assert json.loads((out / "config.json").read_text())["relufy"]["source"] == "tiny-silu"


def test_an_empty_folder_is_used_and_a_published_one_replaced_only_with_force(relu, tmp_path):
    (tmp_path / "pub").mkdir()
    assert publish(*relu, tmp_path / "pub") == (tmp_path / "pub").resolve()
    with pytest.raises(OutputExistsError, match="--force"):
        publish(*relu, tmp_path / "pub")
    assert publish(*relu, tmp_path / "pub", force=True) == (tmp_path / "pub").resolve()


def test_push_without_network_fails_clearly_and_keeps_the_folder(relu, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_value")
    out = tmp_path / "pub"
    code = main(["publish", str(relu[0]), "--results", str(relu[1]), "--out", str(out),
                 "--repo-id", "me/tiny-relu", "--push"])
    captured = capsys.readouterr()
    assert code != 0
    assert captured.err.startswith("relufy publish: error: could not push to 'me/tiny-relu'")
    assert "hf_not_a_real_token_value" not in captured.err + captured.out
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()


def test_two_models_that_differ_in_one_middle_byte_have_different_identities(source, tmp_path):
    """Two runs that differ only in their learning rate change bytes all over their weight files, not only in
    the first and last MiB: a middle byte of a file of several MiB must change the identity, and publishing
    one with the other's results must be refused."""
    from tiny_models import save_tiny_checkpoint

    from relufy.checkpoint import Source, model_identity

    first = save_tiny_checkpoint("llama", tmp_path / "run-a" / "tiny", SAMPLE_TEXT, hidden_act="relu",
                                 intermediate_size=8192)  # about 6 MiB of weights
    second = tmp_path / "run-b" / "tiny"
    shutil.copytree(first, second)
    (first / "README.md").write_text((source / "README.md").read_text())
    weights = second / "model.safetensors"
    data = bytearray(weights.read_bytes())
    assert len(data) > 4 << 20
    data[len(data) // 2] ^= 0x01  # the lowest mantissa bit of one weight in the middle of the file
    weights.write_bytes(bytes(data))
    identity = model_identity(Source(first.resolve()), "relu")
    assert identity != model_identity(Source(second.resolve()), "relu")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"model": "tiny", "lm_eval": {"results": {}}, "sparsity": {"overall": 0.5},
                                   "identity": identity}))
    with pytest.raises(DataError, match=r"evaluates another model.*: weights_sha256 differ"):
        publish(second, results, tmp_path / "pub", license_id="mit")
    assert not (tmp_path / "pub").exists()
    assert publish(first, results, tmp_path / "pub", license_id="mit") == (tmp_path / "pub").resolve()


def test_results_with_a_sampled_identity_from_an_older_relufy_are_refused(relu, tmp_path):
    model, results_path = relu
    results = json.loads(results_path.read_text())
    del results["identity"]["weights_hashed"]
    old = tmp_path / "results.json"
    old.write_text(json.dumps(results))
    with pytest.raises(DataError, match="no fingerprint of every weight byte"):
        publish(model, old, tmp_path / "pub")


def _speed_json(path, identity, dtype: str, dense: float) -> str:
    """A `relufy speed` JSON as it writes one (two batch sizes, generate, decode sparsity, unions), small."""
    rows = [{"batch_size": batch, "new_tokens": 256, "dense_tokens_per_s": dense * batch, "dense_ms_per_step": 1.9,
             "sparse_tokens_per_s": dense * batch * 1.05, "sparse_ms_per_step": 1.8, "token_match": 0.25,
             "speedup": 1.05, "ffn_route": "sparse kernels", "first_divergences": [], "dense_fraction_of_limit": 0.05}
            for batch in (1, 4)]
    speed = {"model": "/somewhere/local/tiny-relu", "identity": identity, "gpu": "NVIDIA H100 80GB HBM3",
             "device": "cuda", "dtype": dtype, "config": {"batch_sizes": [1, 4], "prompt_tokens": 128,
                                                          "new_tokens": 256},
             "cuda_graph": True, "compiled": True, "ffns": 2, "sparse_ffns": 2, "note": None, "weight_bytes": 2.7e8,
             "copy_bandwidth_gb_per_s": 3031.0, "bandwidth_limit_tokens_per_s": 11267.8, "decode": rows,
             "dense_fraction_of_limit": 0.05, "ffn": [], "profile": [],
             "generate": {"batch_size": 1, "new_tokens": 128, "repeats": 3, "dense_tokens_per_s": 32.1,
                          "sparse_tokens_per_s": 22.9, "speedup": 0.71},
             "sparsity": {"overall": 0.9175, "per_layer": [0.9, 0.935], "tokens": 256},
             "union": {"batch_sizes": [1, 4], "overall": {"1": 0.1, "4": 0.26},
                       "per_layer": {"1": [0.1, 0.1], "4": [0.25, 0.27]}},
             "relufy_output": {"command": "relufy speed", "version": "0", "created": "2026-01-01T00:00:00+00:00"}}
    path.write_text(json.dumps(speed))
    return path


def test_the_card_takes_its_speed_from_a_speed_json_of_the_model(relu, tmp_path):
    """--speed: the card quotes `relufy speed`'s bf16 measurement (both batch sizes, generate, unions), not the
    short float32 look that results.json holds; without it the card keeps results.json's."""
    from relufy.checkpoint import Source, model_identity

    model, results_path = relu
    results = json.loads(results_path.read_text())
    results["speed"] = json.loads(_speed_json(tmp_path / "short.json", None, "float32", 111.0).read_text())
    with_short = tmp_path / "results.json"
    with_short.write_text(json.dumps(results))
    speed = _speed_json(tmp_path / "speed.json", model_identity(Source(model), "relu"), "bfloat16", 521.9)
    profiled = json.loads(speed.read_text())
    profiled["profile"] = [{"batch_size": 1, "dense": {}, "sparse": {}, "diff": [
        {"name": "down_kernel", "dense_us_per_step": 0.0, "sparse_us_per_step": 165.7, "delta_us_per_step": 165.7,
         "dense_count_per_step": 0, "sparse_count_per_step": 30}]}]
    speed.write_text(json.dumps(profiled))
    card = (publish(model, with_short, tmp_path / "pub", speed=speed) / "README.md").read_text()
    assert "down_kernel" not in card  # the kernel profile stays in speed.json
    assert "### Decode speed" in card and "| 1 | 521.9 | 548.0 | 1.05x |" in card and "| 4 | 2087.6 |" in card
    assert "NVIDIA H100 80GB HBM3, bfloat16" in card and "(torch.compile) captured as a CUDA graph" in card
    assert "HF generate (batch 1, 128 new tokens" in card and "4 tokens 26.0%" in card
    assert "float32" not in card and "| 111.0 |" not in card and "/somewhere/local" not in card
    card = (publish(model, with_short, tmp_path / "pub", force=True) / "README.md").read_text()
    assert "| 1 | 111.0 |" in card and "521.9" not in card


def test_a_speed_json_of_another_model_or_without_a_fingerprint_is_refused(relu, fatrelu, tmp_path, capsys):
    from relufy.checkpoint import Source, model_identity

    model, results_path = relu
    other = _speed_json(tmp_path / "other.json", model_identity(Source(fatrelu[0]), "fatrelu_0.01"), "bfloat16", 1.0)
    with pytest.raises(DataError, match=r"times another model than .*: config_sha256, activation "
                                        r"\(fatrelu_0.01 timed, relu here\) differ; run `relufy speed"):
        publish(model, results_path, tmp_path / "pub", speed=other)
    old = _speed_json(tmp_path / "old.json", None, "bfloat16", 1.0)
    with pytest.raises(DataError, match=r"records no fingerprint of every weight byte of the model it timed .* run `relufy speed"):
        publish(model, results_path, tmp_path / "pub", speed=old)
    with pytest.raises(DataError, match="is not a JSON written by `relufy speed`"):
        publish(model, results_path, tmp_path / "pub", speed=results_path)
    assert not (tmp_path / "pub").exists()
    assert main(["publish", str(model), "--results", str(results_path), "--speed", str(tmp_path / "missing.json"),
                 "--out", str(tmp_path / "pub")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("relufy publish: error: --speed ") and "does not exist" in err and "\n" not in err


def test_a_real_speed_json_of_the_model_is_taken(relu, tmp_path, monkeypatch):
    """What `relufy speed` writes (here eager on the CPU) passes publish's check and renders on the card."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel tests turn the interpreter on for the session
    model, results_path = relu
    speed = tmp_path / "speed.json"
    assert main(["speed", str(model), "--output", str(speed), "--device", "cpu", "--dtype", "float32",
                 "--batch-sizes", "1,2", "--prompt-tokens", "8", "--new-tokens", "4", "--generate-tokens", "2",
                 "--union-batch-sizes", "1,4", "--ffn-repeats", "1", "--copy-bytes", str(1 << 20)]) == 0
    card = (publish(model, results_path, tmp_path / "pub", speed=speed) / "README.md").read_text()
    assert "### Decode speed" in card and "\n| 1 | " in card and "\n| 2 | " in card and "eager decode steps" in card
    assert "| layer | zeros (batch 1) | union, 1 tok | union, 4 tok |" in card and "HF generate (batch 1" in card
