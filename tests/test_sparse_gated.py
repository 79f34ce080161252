"""relufy::sparse_gated_ffn, the operator relufy's vLLM MLP calls: dense equals the model's FFN, sparse equals dense.

Plain torch + Triton; vLLM is not needed. On CPU the kernels run under TRITON_INTERPRET=1 (set by
conftest); with RELUFY_TEST_CUDA=1 on a GPU they are compiled, and the tensors are on CUDA (the operator
runs compiled kernels on CUDA tensors only).
"""

import os

import pytest
import torch
from tiny_models import build_tiny_model

from relufy.sparse import routing
from relufy.sparse.gated import gated_dense_above, sparse_gated_ffn
from relufy.sparse.kernels import choose_tiles, workspace_size

DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu")

ACTIVATIONS = {"relu": ("relu", 0.0), "relu2": ("relu2", 0.0), "fatrelu_0.01": ("fatrelu", 0.01),
               "shifted_relu_0.05": ("shifted_relu", 0.05)}


def _ffn_weights(hidden_act: str, device=DEVICE):
    """A tiny Llama's first MLP and its weights as vLLM holds them (gate and up merged)."""
    import relufy

    relufy.register_activations()
    mlp = build_tiny_model("llama", hidden_act=hidden_act, initializer_range=0.2).model.layers[0].mlp.to(device)
    w_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
    # W_down stored as the transposed view of a row-major W_down^T, as RelufyMLP.prepare_sparse leaves it
    w_down = mlp.down_proj.weight.detach().t().contiguous().t()
    return mlp, w_gate_up, w_down


def _call(x, w_gate_up, w_down, hidden_act, max_tokens, workspace=None, dense_above=-2):
    name, param = ACTIVATIONS.get(hidden_act, hidden_act)
    if workspace is None:
        workspace = torch.zeros(workspace_size(max(max_tokens, 1), w_down.shape[1], w_down.shape[0]), dtype=torch.int32,
                                device=x.device)
    return torch.ops.relufy.sparse_gated_ffn(x, w_gate_up, None, w_down, None, workspace, name, param, max_tokens,
                                             dense_above)


def _randn(*shape, generator=None):
    return torch.randn(*shape, generator=generator).to(DEVICE)


@pytest.mark.parametrize("hidden_act", list(ACTIVATIONS))
def test_dense_path_equals_the_models_mlp(hidden_act):
    mlp, w_gate_up, w_down = _ffn_weights(hidden_act)
    x = _randn(12, w_gate_up.shape[1])
    with torch.no_grad():
        expected = mlp(x)
    torch.testing.assert_close(_call(x, w_gate_up, w_down, hidden_act, max_tokens=8), expected)  # 12 > 8: dense


@pytest.mark.parametrize("hidden_act", list(ACTIVATIONS))
def test_sparse_path_equals_dense(hidden_act):
    _, w_gate_up, w_down = _ffn_weights(hidden_act)
    x = _randn(3, w_gate_up.shape[1])
    dense = _call(x, w_gate_up, w_down, hidden_act, max_tokens=0)
    sparse = _call(x, w_gate_up, w_down, hidden_act, max_tokens=8)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    # the 3-token call did go to the kernels: they refuse a workspace too small for it
    with pytest.raises(ValueError, match="workspace"):
        _call(x, w_gate_up, w_down, hidden_act, max_tokens=8, workspace=torch.zeros(4, dtype=torch.int32, device=DEVICE))


def test_choice_is_made_at_run_time_under_torch_compile():
    """Traced once with a dynamic token count, the op still runs sparse for 2 tokens and dense for 20."""
    _, w_gate_up, w_down = _ffn_weights("relu")
    workspace = torch.zeros(workspace_size(8, w_down.shape[1], w_down.shape[0]), dtype=torch.int32, device=DEVICE)
    tiny = torch.zeros(4, dtype=torch.int32, device=DEVICE)  # too small for any sparse call: a sparse run raises

    def ffn(x, ws):
        return sparse_gated_ffn(x, w_gate_up, None, w_down, None, ws, "relu", 0.0, 8, -2)

    compiled = torch.compile(ffn, backend="aot_eager", dynamic=True, fullgraph=True)
    for tokens in (2, 20):
        x = _randn(tokens, w_gate_up.shape[1])
        torch.testing.assert_close(compiled(x, workspace), _call(x, w_gate_up, w_down, "relu", 0), rtol=1e-5, atol=1e-5)
    compiled(_randn(20, w_gate_up.shape[1]), tiny)  # dense: the workspace is not read
    with pytest.raises(ValueError, match="workspace"):
        compiled(_randn(2, w_gate_up.shape[1]), tiny)


def test_the_route_threshold_is_sparsifys(monkeypatch, tmp_path):
    """The operator's threshold is the one `sparsify` uses for the same weights: calibrated and cached on
    CUDA, half the neurons without it."""
    monkeypatch.setenv("RELUFY_CACHE", str(tmp_path))
    _, w_gate_up, w_down = _ffn_weights("relu")
    n = w_down.shape[1]
    above = gated_dense_above(w_gate_up, w_down, max_tokens=8)
    if DEVICE.type == "cpu":
        assert above == int(routing.DEFAULT_DENSE_FRACTION * n)
    else:
        assert routing.cache_file().exists()
    assert above == routing.dense_above(w_gate_up[:n], w_gate_up[n:], w_down.t().contiguous(), 8)


def test_a_large_union_reads_every_down_row_and_a_small_one_walks_the_list(monkeypatch):
    """The operator runs the kernels as sparsify's does: the tiles for the device and batch, and above
    `dense_above` active neurons the dense route; both routes equal the dense FFN."""
    import relufy.sparse.kernels.launch as launch  # where both operators find sparse_ffn

    _, w_gate_up, w_down = _ffn_weights("relu")
    n, d = w_down.shape[1], w_down.shape[0]
    above = int(routing.DEFAULT_DENSE_FRACTION * n)
    routes, tiles = torch.zeros(2, dtype=torch.int32, device=DEVICE), []

    def counting(*args, **kwargs):
        tiles.append(args[10])
        return original(*args, **kwargs, routes=routes)

    original = launch.sparse_ffn
    monkeypatch.setattr(launch, "sparse_ffn", counting)
    generator = torch.Generator().manual_seed(3)
    many = _randn(8, w_gate_up.shape[1], generator=generator)  # ReLU: about half active per token
    one = _randn(1, w_gate_up.shape[1], generator=generator)
    gates = torch.nn.functional.linear(one, w_gate_up[:n])
    threshold = float(gates.quantile(0.9))  # FATReLU keeps about a tenth of one token's neurons
    cases = [(many, ("relu", 0.0), [0, 1]), (one, ("fatrelu", threshold), [1, 1])]
    assert int((torch.nn.functional.linear(many, w_gate_up[:n]) > 0).any(0).sum()) > above
    assert int((gates >= threshold).sum()) <= above
    for x, activation, after in cases:
        sparse = _call(x, w_gate_up, w_down, activation, 8, dense_above=above)
        assert routes.tolist() == after  # [sparse route calls, dense route calls]
        torch.testing.assert_close(sparse, _call(x, w_gate_up, w_down, activation, 0), rtol=1e-5, atol=1e-5)
    assert tiles == [choose_tiles(8, n, d, DEVICE), choose_tiles(1, n, d, DEVICE)]


def test_cpu_tensors_run_dense_when_the_kernels_are_compiled(monkeypatch):
    """On a CUDA machine the kernels are compiled for the GPU: a call with CPU tensors must run the dense
    FFN, not launch them (Triton's GPU launcher refuses CPU pointers), even with TRITON_INTERPRET=1 set
    after the kernels were defined."""
    import relufy.sparse.kernels.launch as launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch, "interpreted", lambda: False)
    launches = []
    monkeypatch.setattr(launch, "sparse_ffn", lambda *args, **kwargs: launches.append(args))
    mlp, w_gate_up, w_down = _ffn_weights("relu", device="cpu")
    x = torch.randn(2, w_gate_up.shape[1])
    out = _call(x, w_gate_up, w_down, "relu", max_tokens=8)
    with torch.no_grad():
        expected = mlp(x)
    assert launches == []
    torch.testing.assert_close(out, expected)
