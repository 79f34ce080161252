"""Launching the two kernels of a sparse FFN call, their shared workspace, and the `relufy::sparse_ffn` operator."""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .down import down_kernel
from .gate_up import FATRELU, first_projection_kernel, persistent_first_projection_kernel
from .tiles import MAX_SPLIT, Tiles, choose_tiles
from .up_down import up_down_kernel

MIN_BLOCK_D = 16  # the narrowest column block of the down kernel: bounds its arrival counters
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def interpreted() -> bool:
    """Whether these kernels run under Triton's CPU interpreter: Triton decided it when they were
    defined (TRITON_INTERPRET=1 at import), and setting the variable later changes nothing."""
    return isinstance(first_projection_kernel, InterpretedFunction)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can take tensors on `device`: compiled kernels need CUDA tensors (a CPU
    tensor would reach the GPU launcher), interpreted ones run on any device."""
    return interpreted() or device.type == "cuda"


@functools.lru_cache(maxsize=16)
def _hopper_or_later(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU of compute capability 9.0 or later, which programmatic dependent
    launch needs. Cached: it runs once per device, not per call."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def dependent_launch(tiles: Tiles, device: torch.device) -> bool:
    """Whether this call launches its second kernel as a programmatic dependent of the first: where its row
    asks for it (`Tiles.dependent_launch`), on a compiled kernel's Hopper-or-later GPU. The interpreter has no
    grid dependency control, and older GPUs no programmatic launch; there the row's other tiles still apply."""
    return tiles.dependent_launch and not interpreted() and _hopper_or_later(device)


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python: `triton.cdiv` is a constexpr function whose host call costs microseconds,
    and an eager decode call computes several of these."""
    return -(-a // b)


def workspace_size(tokens: int, n: int, d: int) -> int:
    """int32 words of a workspace for `tokens` x `d` outputs of an FFN with `n` neurons (the state
    words and arrival counters, then fp32 sums of the outputs; `n` does not enter the layout)."""
    return _down_sums(d) + tokens * d


def _down_sums(d: int) -> int:
    """Word offset of the down kernel's fp32 sums: after the count, the finish counter and the down
    kernel's arrival counters, 16-byte aligned."""
    return 4 * _cdiv(2 + _cdiv(d, MIN_BLOCK_D), 4)


@functools.lru_cache(maxsize=1024)
def _kernel_param(activation: int, act_param: float, dtype: torch.dtype) -> float:
    """The parameter the first kernel compares with. A FATReLU threshold is rounded to the activations' dtype,
    as torch rounds the Python number in the dense path's `x < t` (a bf16 tensor is compared with bf16(t)): the
    kernel compares gate values exact in that dtype, so both then keep the same ones. A shift is subtracted in
    float32 by both, unrounded. Cached: it runs once per threshold, not per decode step."""
    if activation == FATRELU:
        return float(torch.tensor(float(act_param), dtype=dtype))
    return float(act_param)


def _first_kernel(x, w_first, w_up, b_first, b_up, x1, index, workspace, activation: int, act_param: float,
                  gated: bool, tiles: Tiles, precision: str, launch_dependents: bool) -> None:
    """Launch the first kernel: x1 and the list of active neurons (`gated`: W_up read here, not in the
    second kernel). With `tiles.first_programs` it is `persistent_first_projection_kernel` on that many
    programs, else one program per block of block_n rows. `launch_dependents`: the second kernel follows
    as its programmatic dependent (`dependent_launch`)."""
    (tokens, k), n = x.shape, w_first.shape[0]
    args = (x, w_first, w_up if w_up is not None else w_first, b_first, b_up, x1, index, workspace, tokens, n, k,
            _kernel_param(activation, act_param, x.dtype))
    constants = dict(
        GATED=gated, HAS_BIAS=b_first is not None, ACT=activation, DTYPE=_TL_DTYPES[x.dtype], BLOCK_B=tiles.block_b,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, USE_DOT=tiles.use_dot, PRECISION=precision,
        LAUNCH_DEPENDENTS=launch_dependents, num_warps=tiles.warps_first, num_stages=tiles.stages)
    blocks = _cdiv(n, tiles.block_n)
    if tiles.first_programs:  # a fixed grid whose programs each walk row blocks, at most one per block
        # both from `stages`: STAGES pipelines the persistent loop (`tl.range(num_stages=STAGES)`), while
        # num_stages stays the launch default for its other loops (the W_up rows), as in the per-block kernel
        persistent_first_projection_kernel[(min(tiles.first_programs, blocks),)](*args, STAGES=tiles.stages,
                                                                                 **constants)
    else:
        first_projection_kernel[(blocks,)](*args, APPEND_SEM="relaxed" if tiles.relaxed_append else "acq_rel",
                                           **constants)


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
    With `tiles.up_in_down` a gated FFN reads W_up in the second kernel (`up_down_kernel`), not the first.
    With `tiles.first_programs` the first kernel is `persistent_first_projection_kernel` on that many programs.
    With `tiles.dependent_launch` (Hopper or later, compiled) the second kernel is the first's programmatic
    dependent.
    """
    tokens, k = x.shape
    n, d = w_down_t.shape
    if w_first.shape != (n, k) or (w_up is not None and w_up.shape != (n, k)):
        raise ValueError(f"weight shapes {tuple(w_first.shape)}, {None if w_up is None else tuple(w_up.shape)}, "
                         f"{tuple(w_down_t.shape)} do not fit x of width {k}")
    sums_at = _down_sums(d)
    if workspace is None:
        workspace = torch.zeros(sums_at + tokens * d, dtype=torch.int32, device=x.device)
    elif workspace.numel() < sums_at + tokens * d:
        raise ValueError(f"workspace of {workspace.numel()} words is too small for {tokens} tokens "
                         f"({sums_at + tokens * d} needed)")
    x = x.contiguous()
    tiles = tiles or choose_tiles(tokens, n, d, x.device)
    x1 = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    index = torch.empty(n, dtype=torch.int32, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    up_in_down = tiles.up_in_down and w_up is not None
    if tiles.up_in_down and not up_in_down:
        # a non-gated FFN on an "up in down" row runs two kernels after all: the down kernel's bound on
        # programs per column block holds
        tiles = dataclasses.replace(tiles, split=min(tiles.split, MAX_SPLIT))
    after_first = dependent_launch(tiles, x.device)
    _first_kernel(x, w_first, w_up, b_first, b_up, x1, index, workspace, activation, act_param,
                  w_up is not None and not up_in_down, tiles, precision, after_first)
    out = torch.empty(tokens, d, dtype=x.dtype, device=x.device)
    sums = workspace[sums_at:].view(torch.float32)
    dense_above = n if dense_above is None else int(dense_above)
    if up_in_down:
        up_down_kernel[(tiles.split,)](
            x, w_up, b_up, x1, index, workspace, w_down_t, b_down, sums, out, routes, tokens, n, k, d, dense_above,
            SPLIT=tiles.split, HAS_UP_BIAS=b_up is not None, HAS_BIAS=b_down is not None,
            HAS_ROUTES=routes is not None, BLOCK_B=tiles.block_b, CHUNK=tiles.chunk, BLOCK_K=tiles.block_k,
            BLOCK_D=tiles.block_d, USE_DOT=tiles.use_dot, PRECISION=precision, AFTER_FIRST=after_first,
            num_warps=tiles.warps_down, num_stages=tiles.stages_down, launch_pdl=after_first)
        return out
    down_kernel[(tiles.split, _cdiv(d, tiles.block_d))](
        x1, index, workspace, w_down_t, b_down, sums, out, routes, tokens, n, d, dense_above, SPLIT=tiles.split,
        HAS_BIAS=b_down is not None, HAS_ROUTES=routes is not None, BLOCK_B=tiles.block_b, CHUNK=tiles.chunk,
        BLOCK_D=tiles.block_d, USE_DOT=tiles.use_dot, PRECISION=precision, AFTER_FIRST=after_first,
        num_warps=tiles.warps_down, num_stages=tiles.stages_down, launch_pdl=after_first)
    return out


def routed_sparse_ffn(x: torch.Tensor, w_first: torch.Tensor, w_up: torch.Tensor | None, w_down_t: torch.Tensor,
                      b_first: torch.Tensor | None, b_up: torch.Tensor | None, b_down: torch.Tensor | None,
                      workspace: torch.Tensor | None, activation: int, act_param: float,
                      dense_above: int) -> torch.Tensor:
    """`sparse_ffn` with the tiles for this GPU and batch and the dense route above `dense_above`
    active neurons (< -1: never): the one path of both operators, `relufy::sparse_ffn` (sparsify)
    and `relufy::sparse_gated_ffn` (vLLM)."""
    tiles = choose_tiles(x.shape[0], w_down_t.shape[0], w_down_t.shape[1], x.device)
    return sparse_ffn(x, w_first, w_up, w_down_t, activation, act_param, b_first, b_up, b_down, workspace, tiles,
                      None if dense_above < -1 else dense_above)


def sparse_ffn_op(x: torch.Tensor, w_first: torch.Tensor, w_up: torch.Tensor | None, w_down_t: torch.Tensor,
                  b_first: torch.Tensor | None, b_up: torch.Tensor | None, b_down: torch.Tensor | None,
                  workspace: torch.Tensor | None, activation: int, act_param: float,
                  dense_above: int = -2) -> torch.Tensor:
    """`routed_sparse_ffn` as the `relufy::sparse_ffn` operator, which torch.compile keeps whole (its kernels
    are opaque to Inductor); call it as `torch.ops.relufy.sparse_ffn`.

    `dense_above` < -1 means never dense. The workspace is not declared mutated: the kernels return
    it to all zeros before they end.
    """
    return routed_sparse_ffn(x, w_first, w_up, w_down_t, b_first, b_up, b_down, workspace, activation, act_param,
                             dense_above)


def _fake_sparse_ffn(x, w_first, w_up, w_down_t, b_first, b_up, b_down, workspace, activation, act_param,
                     dense_above=-2):
    return x.new_empty(x.shape[0], w_down_t.shape[1])


# Registered directly with the dispatcher (as vLLM's and SGLang's `direct_register_custom_op` do), not with
# `torch.library.custom_op`, whose eager calls pass through its Python autograd wrapper, a dynamo guard and
# output-aliasing checks: on a CPU, 25 us of host time per call of an empty operator against 8 us registered
# directly, and eager decode (HF `generate`) pays it once per layer and token. The operator keeps its name,
# schema (inferred from `sparse_ffn_op`), pt2-compliant tag and fake implementation; neither registration has
# an autograd formula.
_LIBRARY = torch.library.Library("relufy", "FRAGMENT")
_LIBRARY.define("sparse_ffn" + torch.library.infer_schema(sparse_ffn_op, mutates_args=()),
                tags=(torch.Tag.pt2_compliant_tag,))
_LIBRARY.impl("sparse_ffn", sparse_ffn_op, "CompositeExplicitAutograd")
torch.library.register_fake("relufy::sparse_ffn", _fake_sparse_ffn, lib=_LIBRARY)
