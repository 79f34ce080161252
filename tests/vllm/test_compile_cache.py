"""vLLM's torch.compile cache key says whether relufy's FFNs run sparse (relufy.vllm.models._add_compile_factor).

vLLM reuses a compiled graph from disk (under VLLM_CACHE_ROOT) when its key matches, and RelufyMLP.forward
compiles to a different graph with the sparse path on than off: a start must not find the other one's graph.
"""

from engines import run_engine


def _compile_key(model):
    """(additional_config, the folder vLLM's compile cache of this start lives in)."""
    config = model.model.vllm_config  # the config vLLM's compile wrapper hashes
    return dict(config.additional_config), config.compilation_config.local_cache_dir


def _started(folder, **engine_args):
    return run_engine(folder, lambda llm: None, _compile_key, **engine_args)[1]


def test_sparse_path_choice_is_in_compile_cache_key(tiny_folder, monkeypatch):
    """RELUFY_VLLM_SPARSE=0 records the dense path; a start whose prepare_sparse turns the sparse path on
    records that and compiles into another cache folder. The second start only reports the sparse path
    (its MLPs stay dense), so the test runs on a CPU, where prepare_sparse never turns it on."""
    from relufy.vllm.mlp import SWITCH, RelufyMLP
    from relufy.vllm.models import COMPILE_FACTOR

    folder = tiny_folder("llama", "relu")
    with monkeypatch.context() as env:
        env.setenv(SWITCH, "0")
        dense_config, dense_cache = _started(folder, enforce_eager=False)
    with monkeypatch.context() as patch:
        patch.setattr(RelufyMLP, "prepare_sparse", lambda self, workspace_for: True)
        sparse_config, sparse_cache = _started(folder, enforce_eager=False)
    assert dense_cache and sparse_cache and dense_cache != sparse_cache
    assert (dense_config.get(COMPILE_FACTOR), sparse_config.get(COMPILE_FACTOR)) == (False, True)


def test_silu_model_keeps_vllms_key(tiny_folder):
    """Without a RelufyMLP nothing is recorded: a SiLU folder's compile cache key is vLLM's own."""
    from relufy.vllm.models import COMPILE_FACTOR

    config, _ = _started(tiny_folder("llama", "silu"), enforce_eager=True)
    assert COMPILE_FACTOR not in config
