import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton decides at decoration time whether a kernel is interpreted, so this must be set before any
# test module imports relufy.sparse.kernels: the CPU runs the sparse kernels under the interpreter,
# a GPU run (RELUFY_TEST_CUDA=1) natively.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("RELUFY_TEST_CUDA") else "1")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TEXT = REPO / "data" / "sample.txt"


def load_script(relative: str, name: str):
    """A script of the repo that is not a package module (bench/, scripts/, experiments/), imported as
    `name`; registered in sys.modules, where dataclasses defined in it look their module up."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def silu_base(tmp_path_factory) -> Path:
    """A tiny SiLU Llama with a tokenizer: recipes convert it to ReLU first."""
    from tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("base") / "tiny-llama", SAMPLE_TEXT)


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A tiny SiLU Llama folder (no tokenizer) at tmp_path/src, for commands that only read weights."""
    from tiny_models import save_tiny_model

    return save_tiny_model("llama", tmp_path / "src")


@pytest.fixture(scope="module")
def relu_checkpoint(tmp_path_factory) -> Path:
    """A tiny ReLU Llama with a tokenizer, shared by the tests of one module."""
    from tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("relu") / "tiny-relu", SAMPLE_TEXT, hidden_act="relu")
