"""The first kernel of a sparse FFN call: the gate, the activation, the list of active neurons, W_up.

Each program owns BLOCK_N neurons. It gets their gate values (the gate decides which neurons are
active, so it is the one dense read), rounds them to the input dtype and applies the activation as
transformers does, then reads the W_up rows of the neurons active for any token of the batch
(masked loads of inactive rows touch no memory). It appends its active neurons to a compact list
with one atomic per program and stores x1 = act(gate) * up at the neurons' own columns (zero for
inactive ones). Non-gated FFNs (GPT-2, GPT-NeoX, Falcon) stop after act(x W_up^T).

The gate comes one of three ways (`GATE`, from `Tiles.gate`):
- "fused": the program reads its gate rows over all of K itself (pointer loads, or Hopper TMA
  tensor-descriptor loads with TMA);
- "split_k": SPLIT_K programs per row block each read a slice of K and add their partial sums
  atomically (fp32); the last to arrive (an arrival counter per row block) finishes the block;
- "cublas": one cuBLAS GEMV (`torch.nn.functional.linear`) before the kernel, which then only
  activates, compacts and reads W_up.
"""

from __future__ import annotations

import triton
import triton.language as tl

# activation codes shared with the Python side (relufy.activations family names)
RELU, FATRELU, SHIFTED_RELU, RELU2 = 0, 1, 2, 3
ACTIVATION_CODES = {"relu": RELU, "fatrelu": FATRELU, "shifted_relu": SHIFTED_RELU, "relu2": RELU2}
# how the kernel gets the gate (`Tiles.gate`)
GATES = {"fused": 0, "split_k": 1, "cublas": 2}
FUSED, SPLIT_K, CUBLAS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


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
def first_projection_kernel(x_ptr, w_first_ptr, w_first_desc, w_up_ptr, b_first_ptr, b_up_ptr, gate_ptr,
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

