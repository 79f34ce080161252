"""Triton kernels for a ReLU-sparse FFN at decode: read only the weight rows of active neurons.

A gated FFN computes y = (act(x W_gate^T) * (x W_up^T)) W_down^T. With a ReLU-family `act`,
a neuron whose gate is zero contributes exactly nothing, so its W_up row and its W_down column
need not be read. Fixed grids, and the active count kept on the device, so the whole call can be
captured in a CUDA graph:

1. `_first_projection_kernel`: each program owns BLOCK_N neurons. It gets their gate values
   (the gate decides activity, so it is the one dense read), applies the activation, and for the
   neurons active for any token of the batch reads their W_up rows (masked loads of inactive rows
   touch no memory). It appends its active neurons to a compact list with one atomic per program
   and stores x1 = act(gate) * up at the neurons' own columns (zero for inactive ones). Non-gated
   FFNs (GPT-2, GPT-NeoX, Falcon) stop after act(x W_up^T). The gate comes one of three ways
   (`Tiles.gate`):
   - "fused": the program reads its gate rows over all of K itself (pointer loads, or Hopper TMA
     tensor-descriptor loads with `Tiles.tma`);
   - "split_k": SPLIT_K programs per row block each read a slice of K and add their partial sums
     atomically (fp32); the last to arrive (an arrival counter per row block) finishes the block;
   - "cublas": one cuBLAS GEMV (`torch.nn.functional.linear`) before the kernel, which then only
     activates, compacts and reads W_up.
2. `_down_kernel`: SPLIT x (D / BLOCK_D) programs; each reads the list's length on the device and
   walks its share of the list, accumulating x1[:, i] * W_down^T[i, cols] from a row-major copy of
   W_down^T (each neuron is one contiguous row), then adds its partial sum atomically (fp32). When
   more than `dense_above` neurons are active it walks all N rows in order instead (the dense
   route: no list, no gather). The last program of each column block adds the bias and writes the
   output in x's dtype; the kernels leave their workspace zero for the next call.

Rounding mirrors the dense PyTorch FFN: the gate and up projections are accumulated in fp32 and
rounded to the input dtype before the activation and the product, so the set of zeros is the one
the dense model sees (up to its different summation order; the "cublas" gate is the dense one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# activation codes shared with the Python side (relufy.activations family names)
RELU, FATRELU, SHIFTED_RELU, RELU2 = 0, 1, 2, 3
ACTIVATION_CODES = {"relu": RELU, "fatrelu": FATRELU, "shifted_relu": SHIFTED_RELU, "relu2": RELU2}
# how the first kernel gets the gate (`Tiles.gate`)
GATES = {"fused": 0, "split_k": 1, "cublas": 2}
FUSED, SPLIT_K, CUBLAS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# the int32 state words at the start of a workspace; the arrival counters and fp32 sums follow them
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
def _rows_times_x(x_ptr, w_ptr, w_desc, rows, row_mask, batch, batch_ok, K, k_start, k_end,
                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  USE_DOT: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """[BLOCK_B, BLOCK_N] fp32: x (B x K) times the weight rows `rows` over K in [k_start, k_end).

    Masked rows are not read (an up projection passes k_end = 0 to skip a block with no active
    row). With TMA the rows are one contiguous block read through the tensor descriptor `w_desc`,
    which fills rows past N and columns past K with zeros. Without tensor cores the products are
    summed elementwise across the loop and reduced over K once at the end, so the loop body has no
    cross-thread reduction.
    """
    row_offsets = rows.to(tl.int64) * K
    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:
        partial = tl.zeros((BLOCK_B, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + batch[:, None] * K + ks[None, :], mask=batch_ok[:, None] & k_ok[None, :], other=0.0)
        if TMA:
            w = w_desc.load([tl.program_id(0) * BLOCK_N, k0])
        else:
            w = tl.load(w_ptr + row_offsets[:, None] + ks[None, :], mask=row_mask[:, None] & k_ok[None, :],
                        other=0.0)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        else:
            partial += x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(partial, axis=2)
    return acc


@triton.jit
def _gate_values(x_ptr, w_ptr, w_desc, gate_ptr, sums_ptr, arrivals_ptr, rows, row_ok, batch, batch_ok, N, K,
                 k_slice, GATE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """(the gate of this block's rows, fp32 [BLOCK_B, BLOCK_N]; the rows this program finishes).

    "cublas" loads the gate computed before the kernel; "fused" reads the rows over all of K;
    "split_k" adds this program's slice of K to fp32 sums and finishes the rows only if it is the
    last of the SPLIT programs of its block to arrive (it then reads the sums with atomics, as the
    down kernel does, and leaves sums and counter zero).
    """
    tile = batch[:, None] * N + rows[None, :]
    ok = batch_ok[:, None] & row_ok[None, :]
    if GATE == CUBLAS:
        total = tl.load(gate_ptr + tile, mask=ok, other=0.0).to(tl.float32)
        mine = row_ok
    elif GATE == FUSED:
        total = _rows_times_x(x_ptr, w_ptr, w_desc, rows, row_ok, batch, batch_ok, K, 0, K,
                              BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, PRECISION, TMA)
        mine = row_ok
    else:
        k_start = tl.program_id(1) * k_slice
        part = _rows_times_x(x_ptr, w_ptr, w_desc, rows, row_ok, batch, batch_ok, K, k_start,
                             tl.minimum(k_start + k_slice, K), BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, PRECISION, TMA)
        tl.atomic_add(sums_ptr + tile, part, mask=ok)
        tl.debug_barrier()
        last = tl.atomic_add(arrivals_ptr + tl.program_id(0), 1) == SPLIT - 1
        mine = rows < tl.where(last, N, 0)
        finishing = batch_ok[:, None] & mine[None, :]
        zeros = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        total = tl.atomic_add(sums_ptr + tile, zeros, mask=finishing)
        tl.store(sums_ptr + tile, zeros, mask=finishing)
        tl.store(arrivals_ptr + tl.program_id(0), 0, mask=last)
    return total, mine


@triton.jit
def _first_projection_kernel(x_ptr, w_first_ptr, w_first_desc, w_up_ptr, b_first_ptr, b_up_ptr, gate_ptr,
                             gate_sums_ptr, gate_arrivals_ptr, x1_ptr, index_ptr, count_ptr, B, N, K, k_slice,
                             act_param, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                             DTYPE: tl.constexpr, GATE: tl.constexpr, SPLIT_K: tl.constexpr, TMA: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    batch = tl.arange(0, BLOCK_B)
    batch_ok = batch < B

    first, mine = _gate_values(x_ptr, w_first_ptr, w_first_desc, gate_ptr, gate_sums_ptr, gate_arrivals_ptr, rows,
                               row_ok, batch, batch_ok, N, K, k_slice, GATE, SPLIT_K, BLOCK_B, BLOCK_N, BLOCK_K,
                               USE_DOT, PRECISION, TMA)
    if HAS_BIAS and GATE != CUBLAS:  # cuBLAS added the gate's bias itself
        first += tl.load(b_first_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    a = _activate(first.to(DTYPE).to(tl.float32), act_param, ACT, DTYPE)
    a = tl.where(batch_ok[:, None] & mine[None, :], a, 0.0)  # padded batch rows must not make a neuron active
    active = (tl.max((a != 0).to(tl.int32), axis=0) > 0) & mine  # the batch's union

    flags = active.to(tl.int32)
    n_active = tl.sum(flags, axis=0)
    if GATED:
        up = _rows_times_x(x_ptr, w_up_ptr, w_up_ptr, rows, active, batch, batch_ok, K, 0,
                           tl.where(n_active > 0, K, 0), BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, PRECISION, False)
        if HAS_BIAS:
            up += tl.load(b_up_ptr + rows, mask=active, other=0.0).to(tl.float32)[None, :]
        x1 = (a * up.to(DTYPE).to(tl.float32)).to(DTYPE)
    else:
        x1 = a.to(DTYPE)

    # append this block's active neurons to the compact list: one atomic per program
    base = tl.atomic_add(count_ptr, n_active, mask=n_active > 0)
    slots = base + tl.cumsum(flags, axis=0) - 1
    tl.store(index_ptr + slots, rows, mask=active)
    tl.store(x1_ptr + batch[:, None] * N + rows[None, :], x1, mask=batch_ok[:, None] & mine[None, :])


@triton.jit
def _down_kernel(x1_ptr, index_ptr, state_ptr, w_down_t_ptr, b_down_ptr, acc_ptr, out_ptr, routes_ptr, B, N, D,
                 dense_above, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROUTES: tl.constexpr,
                 BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr,
                 PRECISION: tl.constexpr):
    count = tl.load(state_ptr + COUNT)
    dense = count > dense_above  # the dense route: every row in order, no list
    rows_total = tl.where(dense, N, count)
    share = tl.cdiv(rows_total, SPLIT)
    start = tl.program_id(0) * share
    end = tl.minimum(start + share, rows_total)
    column_block = tl.program_id(1)
    cols = column_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    batch = tl.arange(0, BLOCK_B)
    batch_ok = batch < B
    if HAS_ROUTES:  # one count per call: calls that took the sparse route, calls that took the dense one
        tl.atomic_add(routes_ptr + dense.to(tl.int32), 1, mask=(tl.program_id(0) == 0) & (column_block == 0))

    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    else:  # summed over the chunk rows once, after the loop
        partial = tl.zeros((BLOCK_B, CHUNK, BLOCK_D), dtype=tl.float32)
    for p0 in range(start, end, CHUNK):
        slots = p0 + tl.arange(0, CHUNK)
        ok = slots < end
        listed = tl.load(index_ptr + slots, mask=slots < tl.where(dense, 0, end), other=0)
        rows = tl.where(dense, slots, listed).to(tl.int64)
        w = tl.load(w_down_t_ptr + rows[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        x1 = tl.load(x1_ptr + batch[:, None] * N + rows[None, :], mask=batch_ok[:, None] & ok[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(x1, w, input_precision=PRECISION)
        else:
            partial += x1[:, :, None].to(tl.float32) * w[None, :, :].to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(partial, axis=1)
    tile = batch[:, None] * D + cols[None, :]
    written = cols < tl.where(start < end, D, 0)  # a program with no share adds nothing
    tl.atomic_add(acc_ptr + tile, acc, mask=batch_ok[:, None] & written[None, :])
    _finish_column_block(state_ptr, b_down_ptr, acc_ptr, out_ptr, tile, cols, col_ok, batch_ok, column_block, D,
                         SPLIT, HAS_BIAS, BLOCK_B, BLOCK_D)


@triton.jit
def _finish_column_block(state_ptr, b_down_ptr, acc_ptr, out_ptr, tile, cols, col_ok, batch_ok, column_block, D,
                         SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The last of the SPLIT programs of this column block finishes it: it reads the sums, zeroes them,
    adds the bias and writes the output; the last program of all resets the count, so the workspace
    is zero when the launch ends.

    The barrier puts every thread's adds before the one thread's arrival. The finisher reads the sums
    with atomics (adding zero): a plain load, even from L2, missed other programs' adds now and then
    on an H200 (wrong rows in about half of the 4-token calls against a dense FFN), while an atomic
    on the same address is ordered after them by the arrival counter's release and acquire.
    (Triton's CPU interpreter has no fp32 atomic exchange.)
    """
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
    """Block sizes, launch shape and gate variant of one call (`choose_tiles` picks them per GPU and batch)."""

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
    gate: str = "fused"  # a key of GATES
    split_k: int = 1  # programs per row block with the "split_k" gate
    tma: bool = False  # read the gate rows through a TMA tensor descriptor ("fused" and "split_k")


# The first kernel's tiles per GPU and batch class (largest batch of the class), read off
# `python bench/sparse_ffn.py --sweep-tiles --shapes llama2-7b --batches 1,4,16 --output sweep.json` on an H200.
# One token: four rows per program, 1024-wide K steps, broadcast-and-sum (no tensor cores). More
# tokens: tensor-core dots on a batch padded to 16. The H100 rows repeat the H200's until the sweep
# has run on an H100; a GPU not in the table gets the H200's.
TILE_TABLE = {
    "H200": {1: dict(block_n=4, block_k=1024, use_dot=False, stages=1),
             8: dict(block_n=64, block_k=128, use_dot=True, stages=4),
             1 << 30: dict(block_n=32, block_k=128, use_dot=True, stages=4)},
}
TILE_TABLE["H100"] = TILE_TABLE["H200"]
# The gate variants the bench compares (`with_gate`): changes to the table's tiles.
GATE_VARIANTS = {
    "fused": dict(gate="fused"),
    "fused_tma": dict(gate="fused", tma=True),
    "split_k": dict(gate="split_k", split_k=8),
    "split_k_tma": dict(gate="split_k", split_k=8, tma=True),
    "cublas": dict(gate="cublas"),
}


def gpu_family(name: str) -> str:
    """The TILE_TABLE row of a GPU, from its name (`torch.cuda.get_device_name`)."""
    return next((family for family in TILE_TABLE if family in name), "H200")


def choose_tiles(batch: int, n: int, d: int, device: torch.device, gate: str = "") -> Tiles:
    """The tiles for `batch` tokens on `device` (`gpu_tiles`; larger blocks under the CPU interpreter),
    with the gate variant `gate` (a key of GATE_VARIANTS; "" keeps the table's)."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        tiles = gpu_tiles(batch, d, properties.multi_processor_count, gpu_family(properties.name))
    else:
        tiles = gpu_tiles(batch, d, multiprocessors=4)
        # Triton's CPU interpreter runs programs one by one: fewer, larger ones
        tiles = dataclasses.replace(tiles, block_n=32) if batch == 1 else tiles
    return with_gate(tiles, gate) if gate else tiles


def gpu_tiles(batch: int, d: int, multiprocessors: int, family: str = "H200") -> Tiles:
    """The TILE_TABLE tiles of `family` for `batch` tokens. The down projection is split so that
    there are several programs per multiprocessor while the fp32 atomics stay few."""
    column_blocks = triton.cdiv(d, 128)
    rows = TILE_TABLE[family]
    first = rows[min(largest for largest in rows if batch <= largest)]
    per_processor = 4 if batch == 1 else 8
    return Tiles(block_b=1 if batch == 1 else max(16, triton.next_power_of_2(batch)), chunk=32, block_d=128,
                 split=max(1, min(64, (per_processor * multiprocessors) // column_blocks)), **first)


def with_gate(tiles: Tiles, variant: str) -> Tiles:
    """`tiles` with the gate variant `variant`. Split-K programs own at least 32 rows in short K
    steps (many rows in flight per load, one program in eight finishing); a TMA box is at most 256
    elements wide."""
    changes = dict(GATE_VARIANTS[variant])
    if changes["gate"] == "split_k":
        changes["block_n"] = max(32, tiles.block_n)
        changes["block_k"] = min(tiles.block_k, 256)
    if changes.get("tma"):
        changes["block_k"] = min(changes.get("block_k", tiles.block_k), 256)
        changes["stages"] = max(tiles.stages, 3)
    return dataclasses.replace(tiles, **{"split_k": 1, "tma": False, **changes})


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
    _down_kernel[(tiles.split, triton.cdiv(d, tiles.block_d))](
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
    _first_projection_kernel[(triton.cdiv(n, tiles.block_n), split_k)](
        x, w_first, descriptor, w_up if w_up is not None else w_first, b_first, b_up, gate,
        gate_sums, gate_arrivals, x1, index, workspace, tokens, n, k,
        k_slice, float(act_param), GATED=w_up is not None, HAS_BIAS=b_first is not None, ACT=activation,
        DTYPE=_TL_DTYPES[x.dtype], GATE=GATES[tiles.gate], SPLIT_K=split_k, TMA=tma, BLOCK_B=tiles.block_b,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, USE_DOT=tiles.use_dot,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=tiles.warps_first,
        num_stages=tiles.stages)


@torch.library.custom_op("relufy::sparse_ffn", mutates_args=())
def sparse_ffn_op(x: torch.Tensor, w_first: torch.Tensor, w_up: torch.Tensor | None, w_down_t: torch.Tensor,
                  b_first: torch.Tensor | None, b_up: torch.Tensor | None, b_down: torch.Tensor | None,
                  workspace: torch.Tensor | None, activation: int, act_param: float, gate: str = "",
                  dense_above: int = -2) -> torch.Tensor:
    """`sparse_ffn` as an operator that torch.compile keeps whole (its kernels are opaque to Inductor).

    `gate` is a key of GATE_VARIANTS ("": the table's); `dense_above` < -1 means never dense. The
    workspace is not declared mutated: the kernels return it to all zeros before they end.
    """
    tiles = choose_tiles(x.shape[0], w_down_t.shape[0], w_down_t.shape[1], x.device, gate)
    return sparse_ffn(x, w_first, w_up, w_down_t, activation, act_param, b_first, b_up, b_down, workspace, tiles,
                      None if dense_above < -1 else dense_above)


@sparse_ffn_op.register_fake
def _(x, w_first, w_up, w_down_t, b_first, b_up, b_down, workspace, activation, act_param, gate="", dense_above=-2):
    return x.new_empty(x.shape[0], w_down_t.shape[1])
