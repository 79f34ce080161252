"""`RelufyMLP`: a vLLM gated MLP with a ReLU-family activation, sparse at decode where it can be.

It adopts the MLP vLLM built (its MergedColumnParallelLinear `gate_up_proj` and RowParallelLinear
`down_proj`), so parameter names, weight loading, tensor-parallel sharding and quantization are
vLLM's. Only the activation is relufy's: act(gate) * up on the merged gate_up output.

The sparse path (`relufy::sparse_gated_ffn`, which picks sparse or dense per call by token count,
and inside the kernels the dense route for a large union of active neurons, as `sparsify` does)
is switched on by `prepare_sparse`, after the weights are loaded, only for unquantized linears on
CUDA with Triton installed and `RELUFY_VLLM_SPARSE` not `0`; otherwise the reason is logged once
and the MLP runs dense through vLLM's linears.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..activations import Activation
from ..sparse.ffn import DEFAULT_MAX_TOKENS
from ..sparse.gated import activation_module, gated, gated_dense_above

logger = logging.getLogger(__name__)
SWITCH = "RELUFY_VLLM_SPARSE"
_logged: set[str] = set()


class GatedActivation(nn.Module):
    """act(gate) * up, the ReLU-family counterpart of vLLM's SiluAndMul.

    The activation is relufy's own (the module transformers builds from the config), also for
    fatrelu: vLLM's FatreluAndMul keeps x > t where relufy, transformers and the sparse kernels keep
    x >= t, so it would differ from them wherever a gate equals the threshold. Under torch.compile
    Inductor fuses these elementwise ops anyway.
    """

    def __init__(self, activation: Activation):
        super().__init__()
        self.act = activation_module(activation.name, activation.param)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return gated(self.act, gate_up)


class RelufyMLP(nn.Module):
    """vLLM's gate_up_proj and down_proj around a ReLU-family activation."""

    def __init__(self, vllm_mlp: nn.Module, activation: Activation):
        super().__init__()
        self.gate_up_proj = vllm_mlp.gate_up_proj
        self.down_proj = vllm_mlp.down_proj
        self.act_fn = GatedActivation(activation)
        self.activation = activation
        # set by prepare_sparse when the sparse path is on; a buffer, so torch.compile sees a tensor input
        self.register_buffer("workspace", None, persistent=False)
        self.dense_above = -2  # the calibrated route threshold, set by prepare_sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.workspace is not None:
            return self._sparse_forward(x)
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down_proj
        bias = down.bias if down.tp_rank == 0 and not down.skip_bias_add else None  # as RowParallelLinear
        out = torch.ops.relufy.sparse_gated_ffn(
            x.reshape(-1, x.shape[-1]), self.gate_up_proj.weight, self.gate_up_proj.bias, down.weight, bias,
            self.workspace, self.activation.name, float(self.activation.param or 0.0), DEFAULT_MAX_TOKENS,
            self.dense_above)
        if down.reduce_results and down.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            out = tensor_model_parallel_all_reduce(out)
        return out.view(*x.shape[:-1], out.shape[-1])

    def prepare_sparse(self, workspace_for) -> bool:
        """Turn the sparse path on if it can run here (see the module docstring); True if it did.

        W_down is made row-major W_down^T under the same Parameter (its `.data` becomes a transposed
        view), so vLLM's dense linear, weight reloads and the kernels share one copy. The dense-route
        threshold is calibrated here, before vLLM captures its CUDA graphs (once per shape and GPU).
        """
        reason = sparse_unavailable(self)
        if reason:
            log_once(f"relufy: {reason}; the ReLU-family FFNs run dense through vLLM's linears")
            return False
        weight = self.down_proj.weight
        if not weight.t().is_contiguous():
            weight.data = weight.data.t().contiguous().t()
        self.workspace = workspace_for(weight.shape[1], weight.shape[0], weight.device)  # N neurons, D outputs
        self.dense_above = gated_dense_above(self.gate_up_proj.weight.detach(), weight.detach(), DEFAULT_MAX_TOKENS)
        return True


def sparse_unavailable(mlp: RelufyMLP) -> str | None:
    """Why `mlp` cannot take the sparse path, or None."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        if not isinstance(layer.quant_method, UnquantizedLinearMethod):
            return f"the linears are quantized ({type(layer.quant_method).__name__}), the sparse kernels read plain weights"
    if mlp.down_proj.weight.device.type != "cuda":
        return f"the model runs on {mlp.down_proj.weight.device.type}, the sparse kernels need CUDA"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def workspace_allocator(max_tokens: int = DEFAULT_MAX_TOKENS):
    """workspace_for(n, d, device): one zeroed kernel workspace per FFN shape (n neurons, d outputs), shared by
    the layers."""
    workspaces: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def workspace_for(n: int, d: int, device: torch.device) -> torch.Tensor:
        from ..sparse.kernels import workspace_size

        if (n, d, device) not in workspaces:
            workspaces[n, d, device] = torch.zeros(workspace_size(max_tokens, n, d), dtype=torch.int32, device=device)
        return workspaces[n, d, device]

    return workspace_for


def log_once(message: str) -> None:
    """A warning logged once per process: vLLM builds every layer's MLP, and one line says it for all."""
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)
