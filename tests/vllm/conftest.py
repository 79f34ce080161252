"""Fixtures for the vLLM tests: run by `make test-vllm` in .venv-vllm (vllm-cpu), never by `make test`."""

import os
from pathlib import Path

import pytest

# One process: the engine runs in the test process, so `LLM.apply_model` can look at the model, and
# vLLM's CPU backend reserves 1 GiB of KV cache instead of a fraction of the machine's memory.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm")

from tiny_models import save_tiny_checkpoint  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)

from relufy.architectures import architecture_for  # noqa: E402

SAMPLE_TEXT = Path(__file__).resolve().parents[2] / "data" / "sample.txt"
# vLLM's CPU attention wants head_dim >= 32: 128 / 4 heads. A larger init than the default keeps most
# greedy choices away from near-ties; the few left are accepted as ties (engines.assert_same_greedy).
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.1)
# Sizes a tiny config (tests/tiny_models.py) fixes apart from SHAPE: the head_dim of Qwen3 and Gemma (8 there),
# and Falcon's FFN width, which vLLM's Falcon takes to be 4 * hidden_size whatever ffn_hidden_size says.
SHAPE_OF = {"qwen3": dict(head_dim=32), "gemma": dict(head_dim=32), "gemma2": dict(head_dim=32),
            "gemma3_text": dict(head_dim=32), "falcon": dict(ffn_hidden_size=512)}


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """tiny_folder(model_type, hidden_act): a saved tiny checkpoint (built once per pair), `hidden_act` under the
    family's activation key."""
    built = {}

    def make(model_type: str, hidden_act: str):
        if (model_type, hidden_act) not in built:
            folder = tmp_path_factory.mktemp("vllm") / f"{model_type}-{hidden_act}"
            if hidden_act.startswith(("fatrelu", "shifted_relu")):
                import relufy

                relufy.register_activations()
            key = architecture_for(model_type).activation_key  # hidden_act, or Gemma 2's hidden_activation...
            save_tiny_checkpoint(model_type, folder, SAMPLE_TEXT, **SHAPE, **SHAPE_OF.get(model_type, {}),
                                 **{key: hidden_act})
            built[model_type, hidden_act] = folder
        return built[model_type, hidden_act]

    return make

