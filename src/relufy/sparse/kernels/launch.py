"""Launching the two kernels of a sparse FFN call, their shared workspace, and the `relufy::sparse_ffn` operator."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .down import down_kernel
from .gate_up import GATES, first_projection_kernel
from .tiles import Tiles, choose_tiles

MIN_BLOCK_D = 16  # the narrowest column block of the down kernel: bounds its arrival counters
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def workspace_size(tokens: int, n: int, d: int) -> int:
    """int32 words of a workspace for `tokens` x `d` outputs of an FFN with `n` neurons."""
    return _layout(tokens, n, d)[-1]


def _layout(tokens: int, n: int, d: int) -> tuple[int, int, int, int]:
    """Word offsets: the gate's arrival counters (after the count, the finish counter and the down
    kernel's arrival counters), the down sums, the gate sums (fp32), and the end."""
    gate_arrivals = 2 + triton.cdiv(d, MIN_BLOCK_D)
    down_sums = 4 * triton.cdiv(gate_arrivals + n, 4)  # 16-byte aligned
    gate_sums = down_sums + tokens * d
    return gate_arrivals, down_sums, gate_sums, gate_sums + tokens * n


def sparse_ffn(x: torch.Tensor, w_first: torch.Tensor, w_up: torch.Tensor | None, w_down_t: torch.Tensor,
               activation: int, act_param: float = 0.0, b_first: torch.Tensor | None = None,
               b_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
               workspace: torch.Tensor | None = None, tiles: Tiles | None = None, dense_above: int | None = None,
               routes: torch.Tensor | None = None) -> torch.Tensor:
    """The FFN of `x` (tokens x K) reading only the weight rows of active neurons.

    `w_first` is W_gate (gated) or W_up (non-gated), N x K; `w_up` is W_up for gated FFNs, else
    None; `w_down_t` is W_down^T, N x D, row-major. Biases are optional. Returns tokens x D in x's
    dtype; accumulation is fp32 throughout. `workspace` (int32, zero, at least `workspace_size`
    words) is left zero by the kernels, so one can serve every call on a stream; without it, a
    zeroed one is allocated (one memset). When more than `dense_above` neurons are active for the
    batch, the down kernel reads all N rows in order (None: never). `routes` (int32, 2 words), if
    given, counts the calls that took the sparse route (word 0) and the dense one (word 1).
    """
    tokens, k = x.shape
    n, d = w_down_t.shape
    if w_first.shape != (n, k) or (w_up is not None and w_up.shape != (n, k)):
        raise ValueError(f"weight shapes {tuple(w_first.shape)}, {None if w_up is None else tuple(w_up.shape)}, "
                         f"{tuple(w_down_t.shape)} do not fit x of width {k}")
    if workspace is None:
        workspace = torch.zeros(workspace_size(tokens, n, d), dtype=torch.int32, device=x.device)
    elif workspace.numel() < workspace_size(tokens, n, d):
        raise ValueError(f"workspace of {workspace.numel()} words is too small for {tokens} tokens "
                         f"({workspace_size(tokens, n, d)} needed)")
    x = x.contiguous()
    tiles = tiles or choose_tiles(tokens, n, d, x.device)
    x1 = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    index = torch.empty(n, dtype=torch.int32, device=x.device)
    gate_arrivals, down_sums, gate_sums, _ = _layout(tokens, n, d)
    _first_projection(x, w_first, w_up, b_first, b_up, x1, index, workspace, activation, act_param, tiles,
                      workspace[gate_arrivals:], workspace[gate_sums:].view(torch.float32))
    out = torch.empty(tokens, d, dtype=x.dtype, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    down_kernel[(tiles.split, triton.cdiv(d, tiles.block_d))](
        x1, index, workspace, w_down_t, b_down, workspace[down_sums:].view(torch.float32), out, routes,
        tokens, n, d, n if dense_above is None else int(dense_above), SPLIT=tiles.split, HAS_BIAS=b_down is not None,
        HAS_ROUTES=routes is not None, BLOCK_B=tiles.block_b, CHUNK=tiles.chunk, BLOCK_D=tiles.block_d,
        USE_DOT=tiles.use_dot, PRECISION=precision, num_warps=tiles.warps_down, num_stages=tiles.stages)
    return out


def _first_projection(x, w_first, w_up, b_first, b_up, x1, index, workspace, activation, act_param, tiles,
                      gate_arrivals, gate_sums) -> None:
    """Launch the first kernel with `tiles.gate`: the gate from cuBLAS first, or read by the kernel
    (split over K, through a TMA descriptor where the row stride allows one)."""
    tokens, k = x.shape
    n = w_first.shape[0]
    gate = torch.nn.functional.linear(x, w_first, b_first) if tiles.gate == "cublas" else x1
    tma = tiles.tma and (k * x.element_size()) % 16 == 0 and w_first.is_contiguous()
    descriptor = TensorDescriptor.from_tensor(w_first, [tiles.block_n, tiles.block_k]) if tma else w_first
    split_k = tiles.split_k if tiles.gate == "split_k" else 1
    k_slice = tiles.block_k * triton.cdiv(triton.cdiv(k, split_k), tiles.block_k)  # whole K steps per slice
    first_projection_kernel[(triton.cdiv(n, tiles.block_n), split_k)](
        x, w_first, descriptor, w_up if w_up is not None else w_first, b_first, b_up, gate,
        gate_sums, gate_arrivals, x1, index, workspace, tokens, n, k,
        k_slice, float(act_param), GATED=w_up is not None, HAS_BIAS=b_first is not None, ACT=activation,
        DTYPE=_TL_DTYPES[x.dtype], GATE=GATES[tiles.gate], SPLIT_K=split_k, TMA=tma, BLOCK_B=tiles.block_b,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, USE_DOT=tiles.use_dot,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=tiles.warps_first,
        num_stages=tiles.stages)


def routed_sparse_ffn(x: torch.Tensor, w_first: torch.Tensor, w_up: torch.Tensor | None, w_down_t: torch.Tensor,
                      b_first: torch.Tensor | None, b_up: torch.Tensor | None, b_down: torch.Tensor | None,
                      workspace: torch.Tensor | None, activation: int, act_param: float, gate: str,
                      dense_above: int) -> torch.Tensor:
    """`sparse_ffn` with the tiles of gate variant `gate` for this GPU and batch ("": the table's) and
    the dense route above `dense_above` active neurons (< -1: never): the one path of both operators,
    `relufy::sparse_ffn` (sparsify) and `relufy::sparse_gated_ffn` (vLLM)."""
    tiles = choose_tiles(x.shape[0], w_down_t.shape[0], w_down_t.shape[1], x.device, gate)
    return sparse_ffn(x, w_first, w_up, w_down_t, activation, act_param, b_first, b_up, b_down, workspace, tiles,
                      None if dense_above < -1 else dense_above)


@torch.library.custom_op("relufy::sparse_ffn", mutates_args=())
def sparse_ffn_op(x: torch.Tensor, w_first: torch.Tensor, w_up: torch.Tensor | None, w_down_t: torch.Tensor,
                  b_first: torch.Tensor | None, b_up: torch.Tensor | None, b_down: torch.Tensor | None,
                  workspace: torch.Tensor | None, activation: int, act_param: float, gate: str = "",
                  dense_above: int = -2) -> torch.Tensor:
    """`routed_sparse_ffn` as an operator that torch.compile keeps whole (its kernels are opaque to Inductor).

    `gate` is a key of GATE_VARIANTS ("": the table's); `dense_above` < -1 means never dense. The
    workspace is not declared mutated: the kernels return it to all zeros before they end.
    """
    return routed_sparse_ffn(x, w_first, w_up, w_down_t, b_first, b_up, b_down, workspace, activation, act_param,
                             gate, dense_above)


@sparse_ffn_op.register_fake
def _(x, w_first, w_up, w_down_t, b_first, b_up, b_down, workspace, activation, act_param, gate="", dense_above=-2):
    return x.new_empty(x.shape[0], w_down_t.shape[1])
