"""Triton kernels for a ReLU-sparse FFN at decode: read only the weight rows of active neurons.

A gated FFN computes y = (act(x W_gate^T) * (x W_up^T)) W_down^T. With a ReLU-family `act`,
a neuron whose gate is zero contributes exactly nothing, so its W_up row and its W_down column
need not be read. Two launches per FFN call, with fixed grids and the active count kept on the device, so the
whole call can be captured in a CUDA graph:

1. `_first_projection_kernel`: each program owns BLOCK_N neurons. It reads their gate rows in
   full (the gate decides activity, so it is the dense part), applies the activation, and for
   the neurons active for any token of the batch reads their W_up rows (masked loads of the
   inactive rows touch no memory). It appends its active neurons to a compact list with one
   atomic per program and stores their x1 = act(gate) * up there. Non-gated FFNs (GPT-2,
   GPT-NeoX, Falcon) stop after act(x W_up^T).
2. `_down_kernel`: SPLIT x (D / BLOCK_D) programs; each reads the list's length on the device,
   walks its share of the list and accumulates x1[i] * W_down^T[i, cols] from a row-major copy of
   W_down^T (each active neuron is one contiguous row), then adds its partial sum atomically (fp32).
   The last program of each column block adds the bias and writes the output in x's dtype; the
   kernels leave their workspace (count, arrival counters, accumulator) zero for the next call.

Rounding mirrors the dense PyTorch FFN: the gate and up projections are accumulated in fp32 and
rounded to the input dtype before the activation and the product, so the set of zeros is the one
the dense model sees (up to its different summation order).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# activation codes shared with the Python side (relufy.activations family names)
RELU, FATRELU, SHIFTED_RELU, RELU2 = 0, 1, 2, 3
ACTIVATION_CODES = {"relu": RELU, "fatrelu": FATRELU, "shifted_relu": SHIFTED_RELU, "relu2": RELU2}
# the int32 state words at the start of a workspace; the fp32 accumulator follows them
COUNT, FINISHED, ARRIVALS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
MIN_BLOCK_D = 16
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _activate(g, param, ACT: tl.constexpr, DTYPE: tl.constexpr):
    """The activation on fp32 values that are exact in DTYPE; the result is rounded to DTYPE."""
    if ACT == 0:
        a = tl.where(g > 0, g, 0.0)
    elif ACT == 1:
        a = tl.where(g >= param, g, 0.0)
    elif ACT == 2:
        s = (g - param).to(DTYPE).to(tl.float32)
        a = tl.where(s > 0, s, 0.0)
    else:
        r = tl.where(g > 0, g, 0.0)
        a = (r * r).to(DTYPE).to(tl.float32)
    return a


@triton.jit
def _rows_times_x(x_ptr, w_ptr, rows, row_mask, batch, batch_ok, K, k_end,
                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_B, BLOCK_N] fp32: x (B x K) times the weight rows `rows` (masked rows are not read).

    The loop runs to `k_end` (K, or 0 to skip a block with no active row).

    Without tensor cores the products are summed elementwise across the loop and reduced over
    K once at the end, so the loop body has no cross-thread reduction.
    """
    row_offsets = rows.to(tl.int64) * K
    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:
        partial = tl.zeros((BLOCK_B, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + batch[:, None] * K + ks[None, :], mask=batch_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + row_offsets[:, None] + ks[None, :], mask=row_mask[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        else:
            partial += x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(partial, axis=2)
    return acc


@triton.jit
def _first_projection_kernel(x_ptr, w_first_ptr, w_up_ptr, b_first_ptr, b_up_ptr,
                             x1_ptr, index_ptr, count_ptr, B, N, K, act_param,
                             GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                             DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    batch = tl.arange(0, BLOCK_B)
    batch_ok = batch < B

    first = _rows_times_x(x_ptr, w_first_ptr, rows, row_ok, batch, batch_ok, K, K,
                          BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, PRECISION)
    if HAS_BIAS:
        first += tl.load(b_first_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    a = _activate(first.to(DTYPE).to(tl.float32), act_param, ACT, DTYPE)
    a = tl.where(batch_ok[:, None], a, 0.0)  # padded batch rows must not make a neuron active
    active = (tl.max((a != 0).to(tl.int32), axis=0) > 0) & row_ok  # the batch's union

    flags = active.to(tl.int32)
    n_active = tl.sum(flags, axis=0)
    if GATED:
        up = _rows_times_x(x_ptr, w_up_ptr, rows, active, batch, batch_ok, K, tl.where(n_active > 0, K, 0),
                           BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, PRECISION)
        if HAS_BIAS:
            up += tl.load(b_up_ptr + rows, mask=active, other=0.0).to(tl.float32)[None, :]
        x1 = (a * up.to(DTYPE).to(tl.float32)).to(DTYPE)
    else:
        x1 = a.to(DTYPE)

    # append this block's active neurons to the compact list: one atomic per program
    base = tl.atomic_add(count_ptr, n_active, mask=n_active > 0)
    slots = base + tl.cumsum(flags, axis=0) - 1
    tl.store(index_ptr + slots, rows, mask=active)
    tl.store(x1_ptr + batch[:, None] * N + slots[None, :], x1, mask=batch_ok[:, None] & active[None, :])


@triton.jit
def _down_kernel(x1_ptr, index_ptr, state_ptr, w_down_t_ptr, b_down_ptr, acc_ptr, out_ptr, B, N, D,
                 SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    count = tl.load(state_ptr + COUNT)
    share = tl.cdiv(count, SPLIT)
    start = tl.program_id(0) * share
    end = tl.minimum(start + share, count)
    column_block = tl.program_id(1)
    cols = column_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    batch = tl.arange(0, BLOCK_B)
    batch_ok = batch < B

    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    else:  # summed over the chunk rows once, after the loop
        partial = tl.zeros((BLOCK_B, CHUNK, BLOCK_D), dtype=tl.float32)
    for p0 in range(start, end, CHUNK):
        slots = p0 + tl.arange(0, CHUNK)
        ok = slots < end
        rows = tl.load(index_ptr + slots, mask=ok, other=0).to(tl.int64)
        w = tl.load(w_down_t_ptr + rows[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        x1 = tl.load(x1_ptr + batch[:, None] * N + slots[None, :], mask=batch_ok[:, None] & ok[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(x1, w, input_precision=PRECISION)
        else:
            partial += x1[:, :, None].to(tl.float32) * w[None, :, :].to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(partial, axis=1)
    tile = batch[:, None] * D + cols[None, :]
    written = cols < tl.where(start < end, D, 0)  # a program with no share adds nothing
    tl.atomic_add(acc_ptr + tile, acc, mask=batch_ok[:, None] & written[None, :])

    # The last of the SPLIT programs of this column block finishes it: it reads the sums, zeroes them,
    # adds the bias and writes the output; the last program of all resets the count, so the workspace
    # is zero when the launch ends. The barrier puts every thread's adds before the one thread's
    # arrival. The finisher reads the sums with atomics (adding zero): a plain load, even from L2,
    # missed other programs' adds now and then on an H200 (wrong rows in about half of the 4-token
    # calls against a dense FFN), while an atomic on the same address is ordered after them by the
    # arrival counter's release and acquire. (Triton's CPU interpreter has no fp32 atomic exchange.)
    tl.debug_barrier()
    arrived = tl.atomic_add(state_ptr + ARRIVALS + column_block, 1)
    last = arrived == SPLIT - 1
    finishing = batch_ok[:, None] & (cols < tl.where(last, D, 0))[None, :]
    zeros = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    total = tl.atomic_add(acc_ptr + tile, zeros, mask=finishing)
    tl.store(acc_ptr + tile, zeros, mask=finishing)
    if HAS_BIAS:
        total += tl.load(b_down_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=finishing)
    tl.store(state_ptr + ARRIVALS + column_block, 0, mask=last)  # every program of the block has arrived
    finished = tl.atomic_add(state_ptr + FINISHED, 1) == SPLIT * tl.num_programs(1) - 1
    tl.store(state_ptr + COUNT, 0, mask=finished)
    tl.store(state_ptr + FINISHED, 0, mask=finished)


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch shape of one call (chosen by `choose_tiles` from the batch and dtype)."""

    block_b: int
    block_n: int
    block_k: int
    use_dot: bool
    split: int
    chunk: int
    block_d: int
    warps_first: int = 4
    warps_down: int = 4
    stages: int = 3


def choose_tiles(batch: int, n: int, d: int, device: torch.device) -> Tiles:
    """The tiles for `batch` tokens on `device` (`gpu_tiles`; larger blocks under the CPU interpreter)."""
    if device.type == "cuda":
        return gpu_tiles(batch, d, torch.cuda.get_device_properties(device).multi_processor_count)
    tiles = gpu_tiles(batch, d, multiprocessors=4)
    # Triton's CPU interpreter runs programs one by one: fewer, larger ones
    return dataclasses.replace(tiles, block_n=32) if batch == 1 else tiles


def gpu_tiles(batch: int, d: int, multiprocessors: int) -> Tiles:
    """Tiles read off `bench/sparse_ffn.py --sweep-tiles` on an H200 (Llama-2-7B FFN, 90% zeros).

    One token: four rows per program, 1024-wide K steps, broadcast-and-sum (no tensor cores).
    More tokens: tensor-core dots on a batch padded to 16. The down projection is split so that
    there are several programs per multiprocessor while the fp32 atomics stay few.
    """
    column_blocks = triton.cdiv(d, 128)
    if batch == 1:
        return Tiles(block_b=1, block_n=4, block_k=1024, use_dot=False, chunk=32, block_d=128, stages=1,
                     split=max(1, min(64, (4 * multiprocessors) // column_blocks)))
    return Tiles(block_b=max(16, triton.next_power_of_2(batch)), block_n=64 if batch <= 8 else 32, block_k=128,
                 use_dot=True, chunk=32, block_d=128, stages=4,
                 split=max(1, min(64, (8 * multiprocessors) // column_blocks)))


def workspace_size(tokens: int, d: int) -> int:
    """int32 words of a workspace for `tokens` x `d` outputs: state words, then the fp32 accumulator."""
    return _accumulator_offset(d) + tokens * d


def _accumulator_offset(d: int) -> int:
    return 4 * triton.cdiv(2 + triton.cdiv(d, MIN_BLOCK_D), 4)  # 16-byte aligned


def sparse_ffn(x: torch.Tensor, w_first: torch.Tensor, w_up: torch.Tensor | None, w_down_t: torch.Tensor,
               activation: int, act_param: float = 0.0, b_first: torch.Tensor | None = None,
               b_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
               workspace: torch.Tensor | None = None, tiles: Tiles | None = None) -> torch.Tensor:
    """The FFN of `x` (tokens x K) reading only the weight rows of active neurons.

    `w_first` is W_gate (gated) or W_up (non-gated), N x K; `w_up` is W_up for gated FFNs, else
    None; `w_down_t` is W_down^T, N x D, row-major. Biases are optional. Returns tokens x D in x's
    dtype; accumulation is fp32 throughout. `workspace` (int32, zero, at least `workspace_size`
    words) is left zero by the kernels, so one can serve every call on a stream; without it, a
    zeroed one is allocated (one memset).
    """
    tokens, k = x.shape
    n, d = w_down_t.shape
    if w_first.shape != (n, k) or (w_up is not None and w_up.shape != (n, k)):
        raise ValueError(f"weight shapes {tuple(w_first.shape)}, {None if w_up is None else tuple(w_up.shape)}, "
                         f"{tuple(w_down_t.shape)} do not fit x of width {k}")
    if workspace is None:
        workspace = torch.zeros(workspace_size(tokens, d), dtype=torch.int32, device=x.device)
    elif workspace.numel() < workspace_size(tokens, d):
        raise ValueError(f"workspace of {workspace.numel()} words is too small for {tokens} tokens "
                         f"({workspace_size(tokens, d)} needed)")
    x = x.contiguous()
    tiles = tiles or choose_tiles(tokens, n, d, x.device)
    dtype = _TL_DTYPES[x.dtype]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    acc = workspace[_accumulator_offset(d):].view(torch.float32)
    index = torch.empty(n, dtype=torch.int32, device=x.device)
    x1 = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    out = torch.empty(tokens, d, dtype=x.dtype, device=x.device)

    _first_projection_kernel[(triton.cdiv(n, tiles.block_n),)](
        x, w_first, w_up if w_up is not None else w_first, b_first, b_up, x1, index, workspace, tokens, n, k,
        float(act_param), GATED=w_up is not None, HAS_BIAS=b_first is not None, ACT=activation, DTYPE=dtype,
        BLOCK_B=tiles.block_b, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, USE_DOT=tiles.use_dot,
        PRECISION=precision, num_warps=tiles.warps_first, num_stages=tiles.stages)
    _down_kernel[(tiles.split, triton.cdiv(d, tiles.block_d))](
        x1, index, workspace, w_down_t, b_down, acc, out, tokens, n, d, SPLIT=tiles.split,
        HAS_BIAS=b_down is not None, BLOCK_B=tiles.block_b, CHUNK=tiles.chunk, BLOCK_D=tiles.block_d,
        USE_DOT=tiles.use_dot, PRECISION=precision, num_warps=tiles.warps_down, num_stages=tiles.stages)
    return out


@torch.library.custom_op("relufy::sparse_ffn", mutates_args=())
def sparse_ffn_op(x: torch.Tensor, w_first: torch.Tensor, w_up: torch.Tensor | None, w_down_t: torch.Tensor,
                  b_first: torch.Tensor | None, b_up: torch.Tensor | None, b_down: torch.Tensor | None,
                  workspace: torch.Tensor | None, activation: int, act_param: float) -> torch.Tensor:
    """`sparse_ffn` as an operator that torch.compile keeps whole (its kernels are opaque to Inductor).

    The workspace is not declared mutated: the kernels return it to all zeros before they end.
    """
    return sparse_ffn(x, w_first, w_up, w_down_t, activation, act_param, b_first, b_up, b_down, workspace)


@sparse_ffn_op.register_fake
def _(x, w_first, w_up, w_down_t, b_first, b_up, b_down, workspace, activation, act_param):
    return x.new_empty(x.shape[0], w_down_t.shape[1])
