"""relufy::sparse_gated_ffn, the operator relufy's vLLM MLP calls: dense equals the model's FFN, sparse equals dense.

Plain torch + Triton (CPU: the kernels under TRITON_INTERPRET=1, set by conftest); vLLM is not needed.
"""

import pytest
import torch
from tiny_models import build_tiny_model

from relufy.sparse.gated import gated_dense_above, sparse_gated_ffn
from relufy.sparse.kernels import choose_tiles, workspace_size
from relufy.sparse.routing import DEFAULT_DENSE_FRACTION

ACTIVATIONS = {"relu": ("relu", 0.0), "relu2": ("relu2", 0.0), "fatrelu_0.01": ("fatrelu", 0.01),
               "shifted_relu_0.05": ("shifted_relu", 0.05)}


def _ffn_weights(hidden_act: str):
    """A tiny Llama's first MLP and its weights as vLLM holds them (gate and up merged)."""
    import relufy

    relufy.register_activations()
    mlp = build_tiny_model("llama", hidden_act=hidden_act, initializer_range=0.2).model.layers[0].mlp
    w_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
    # W_down stored as the transposed view of a row-major W_down^T, as RelufyMLP.prepare_sparse leaves it
    w_down = mlp.down_proj.weight.detach().t().contiguous().t()
    return mlp, w_gate_up, w_down


def _call(x, w_gate_up, w_down, hidden_act, max_tokens, workspace=None, gate="", dense_above=-2):
    name, param = ACTIVATIONS.get(hidden_act, hidden_act)
    if workspace is None:
        workspace = torch.zeros(workspace_size(max(max_tokens, 1), w_down.shape[1], w_down.shape[0]), dtype=torch.int32)
    return torch.ops.relufy.sparse_gated_ffn(x, w_gate_up, None, w_down, None, workspace, name, param, max_tokens,
                                             gate, dense_above)


@pytest.mark.parametrize("hidden_act", list(ACTIVATIONS))
def test_dense_path_equals_the_models_mlp(hidden_act):
    mlp, w_gate_up, w_down = _ffn_weights(hidden_act)
    x = torch.randn(12, w_gate_up.shape[1])
    with torch.no_grad():
        expected = mlp(x)
    torch.testing.assert_close(_call(x, w_gate_up, w_down, hidden_act, max_tokens=8), expected)  # 12 > 8: dense


@pytest.mark.parametrize("hidden_act", list(ACTIVATIONS))
def test_sparse_path_equals_dense(hidden_act):
    _, w_gate_up, w_down = _ffn_weights(hidden_act)
    x = torch.randn(3, w_gate_up.shape[1])
    dense = _call(x, w_gate_up, w_down, hidden_act, max_tokens=0)
    sparse = _call(x, w_gate_up, w_down, hidden_act, max_tokens=8)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    # the 3-token call did go to the kernels: they refuse a workspace too small for it
    with pytest.raises(ValueError, match="workspace"):
        _call(x, w_gate_up, w_down, hidden_act, max_tokens=8, workspace=torch.zeros(4, dtype=torch.int32))


def test_choice_is_made_at_run_time_under_torch_compile():
    """Traced once with a dynamic token count, the op still runs sparse for 2 tokens and dense for 20."""
    _, w_gate_up, w_down = _ffn_weights("relu")
    workspace = torch.zeros(workspace_size(8, w_down.shape[1], w_down.shape[0]), dtype=torch.int32)
    tiny = torch.zeros(4, dtype=torch.int32)  # too small for any sparse call: a sparse run raises

    def ffn(x, ws):
        return sparse_gated_ffn(x, w_gate_up, None, w_down, None, ws, "relu", 0.0, 8, "", -2)

    compiled = torch.compile(ffn, backend="aot_eager", dynamic=True, fullgraph=True)
    for tokens in (2, 20):
        x = torch.randn(tokens, w_gate_up.shape[1])
        torch.testing.assert_close(compiled(x, workspace), _call(x, w_gate_up, w_down, "relu", 0), rtol=1e-5, atol=1e-5)
    compiled(torch.randn(20, w_gate_up.shape[1]), tiny)  # dense: the workspace is not read
    with pytest.raises(ValueError, match="workspace"):
        compiled(torch.randn(2, w_gate_up.shape[1]), tiny)


@pytest.mark.parametrize("gate", ["", "cublas"])
def test_the_calibrated_route_and_gate_variant_are_sparsifys(gate, monkeypatch):
    """The operator runs the kernels as sparsify's does: the gate variant's tiles, and with the calibrated
    threshold (without CUDA, half the neurons) a large union of active neurons reads every down row while a
    small one walks the list; both equal the dense FFN."""
    import relufy.sparse.kernels.launch as launch  # where both operators find sparse_ffn

    _, w_gate_up, w_down = _ffn_weights("relu")
    n, d = w_down.shape[1], w_down.shape[0]
    above = gated_dense_above(w_gate_up, w_down, max_tokens=8, gate=gate)
    assert above == int(DEFAULT_DENSE_FRACTION * n)
    routes, tiles = torch.zeros(2, dtype=torch.int32), []

    def counting(*args, **kwargs):
        tiles.append(args[10])
        return original(*args, **kwargs, routes=routes)

    original = launch.sparse_ffn
    monkeypatch.setattr(launch, "sparse_ffn", counting)
    generator = torch.Generator().manual_seed(3)
    many = torch.randn(8, w_gate_up.shape[1], generator=generator)  # ReLU: about half active per token
    one = torch.randn(1, w_gate_up.shape[1], generator=generator)
    gates = torch.nn.functional.linear(one, w_gate_up[:n])
    threshold = float(gates.quantile(0.9))  # FATReLU keeps about a tenth of one token's neurons
    cases = [(many, ("relu", 0.0), [0, 1]), (one, ("fatrelu", threshold), [1, 1])]
    assert int((torch.nn.functional.linear(many, w_gate_up[:n]) > 0).any(0).sum()) > above
    assert int((gates >= threshold).sum()) <= above
    for x, activation, after in cases:
        sparse = _call(x, w_gate_up, w_down, activation, 8, gate=gate, dense_above=above)
        assert routes.tolist() == after  # [sparse route calls, dense route calls]
        torch.testing.assert_close(sparse, _call(x, w_gate_up, w_down, activation, 0), rtol=1e-5, atol=1e-5)
    assert tiles == [choose_tiles(8, n, d, many.device, gate), choose_tiles(1, n, d, one.device, gate)]
