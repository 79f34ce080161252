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


@pytest.fixture(scope="module")
def silu_base(tmp_path_factory) -> Path:
    """A tiny SiLU Llama with a tokenizer: recipes convert it to ReLU first."""
    from tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("base") / "tiny-llama", SAMPLE_TEXT)
