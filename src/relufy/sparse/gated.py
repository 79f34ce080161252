"""`relufy::sparse_gated_ffn`: a gated ReLU-family FFN call that chooses sparse or dense by itself.

A serving engine that traces its model once (vLLM compiles the forward with the token count as a
dynamic dimension and drops shape guards) cannot choose in Python between the sparse decode
kernels and the dense FFN: the branch would be frozen at trace time. The choice is made inside
this operator, which torch.compile keeps whole: up to `max_tokens` tokens on a device the kernels
run on (CUDA, or any under Triton's interpreter: `relufy.sparse.device`), the kernels run; otherwise
the dense computation, which is also the reference the kernels are tested against. The kernels are
called exactly as `sparsify`'s operator calls them (`kernels.routed_sparse_ffn`): the same tiles for
the GPU, and the same calibrated dense route (`gated_dense_above`, measured once per shape and GPU
by `relufy.sparse.routing`), so a large union of active neurons reads every down row.

The weights come in the usual Linear layout: `w_gate_up` is the merged [W_gate; W_up] (2N x K)
and `w_down` is D x N. The kernels read W_down^T row by row, so callers that run sparse keep
`w_down` as a transposed view of a row-major N x D tensor (`w_down.t()` contiguous, no copy);
otherwise each sparse call copies it. Triton is imported only when a sparse call happens.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..activations import Activation
from .device import kernels_run_on
from .routing import dense_above as calibrated_dense_above

logger = logging.getLogger(__name__)


@functools.cache
def activation_module(name: str, param: float | None) -> nn.Module:
    """The activation exactly as transformers builds it from the config (relufy's definition)."""
    return Activation(name, param).module()


def gated(activation: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up on a merged gate_up tensor (gate first, as vLLM's MergedColumnParallelLinear)."""
    n = gate_up.shape[-1] // 2
    return activation(gate_up[..., :n]) * gate_up[..., n:]


def dense_gated_ffn(x: torch.Tensor, w_gate_up: torch.Tensor, b_gate_up: torch.Tensor | None,
                    w_down: torch.Tensor, b_down: torch.Tensor | None, activation: nn.Module) -> torch.Tensor:
    """The dense FFN, with the same operations (and roundings) as a transformers or vLLM gated MLP."""
    return F.linear(gated(activation, F.linear(x, w_gate_up, b_gate_up)), w_down, b_down)


@functools.cache
def _kernels():
    """relufy.sparse.kernels, or None (logged once) when Triton is missing."""
    try:
        from . import kernels
    except ImportError as exc:
        logger.warning("relufy::sparse_gated_ffn: Triton is not available (%s); the FFN runs dense", exc)
        return None
    return kernels


def _kernels_can_run(x: torch.Tensor) -> bool:
    return kernels_run_on(x.device) and _kernels() is not None


def gated_dense_above(w_gate_up: torch.Tensor, w_down: torch.Tensor, max_tokens: int) -> int:
    """The active count above which a call with these weights takes the dense route: the one
    `sparsify` uses for the same shape and GPU (calibrated on CUDA and cached; without CUDA, half
    the neurons). Call it before any CUDA graph capture: a calibration captures graphs."""
    n = w_down.shape[1]
    return calibrated_dense_above(w_gate_up[:n], w_gate_up[n:], w_down.t().contiguous(), max_tokens)


@torch.library.custom_op("relufy::sparse_gated_ffn", mutates_args=())
def sparse_gated_ffn(x: torch.Tensor, w_gate_up: torch.Tensor, b_gate_up: torch.Tensor | None,
                     w_down: torch.Tensor, b_down: torch.Tensor | None, workspace: torch.Tensor,
                     activation: str, act_param: float, max_tokens: int, dense_above: int) -> torch.Tensor:
    """y = down(act(gate(x)) * up(x)) for x of shape tokens x K; sparse kernels for 1..max_tokens tokens.

    `activation` is a relufy family name (relu, relu2, fatrelu, shifted_relu) and `act_param` its
    threshold or shift (ignored by relu and relu2). `workspace` is an int32 buffer of at least
    `kernels.workspace_size(max_tokens, N, D)` zeros, allocated before any CUDA graph capture; the
    kernels leave it zero, so it is not declared mutated. `dense_above` is the active count above
    which the down kernel reads every row (`gated_dense_above`; < -1: never).
    """
    param = act_param if activation in ("fatrelu", "shifted_relu") else None
    tokens = x.shape[0]
    if not 0 < tokens <= max_tokens or not _kernels_can_run(x):
        return dense_gated_ffn(x, w_gate_up, b_gate_up, w_down, b_down, activation_module(activation, param))
    kernels = _kernels()
    n = w_down.shape[1]
    b_gate, b_up = (None, None) if b_gate_up is None else (b_gate_up[:n], b_gate_up[n:])
    return kernels.routed_sparse_ffn(x, w_gate_up[:n], w_gate_up[n:], w_down.t().contiguous(), b_gate, b_up, b_down,
                                     workspace, kernels.ACTIVATION_CODES[activation], act_param, dense_above)


@sparse_gated_ffn.register_fake
def _(x, w_gate_up, b_gate_up, w_down, b_down, workspace, activation, act_param, max_tokens, dense_above):
    return x.new_empty(x.shape[0], w_down.shape[0])
