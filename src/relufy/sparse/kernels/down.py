"""The second kernel of a sparse FFN call: W_down over the list of active neurons (or every row).

SPLIT x (D / BLOCK_D) programs; each reads the list's length on the device and walks its share of
the list, accumulating x1[:, i] * W_down^T[i, cols] from a row-major copy of W_down^T (each neuron
is one contiguous row), then adds its partial sum atomically (fp32). When more than `dense_above`
neurons are active it walks all N rows in order instead (the dense route: no list, no gather). The
last program of each column block adds the bias and writes the output in x's dtype; the kernels
leave their workspace zero for the next call.
"""

from __future__ import annotations

import triton
import triton.language as tl

# the int32 state words at the start of a workspace; the arrival counters and fp32 sums follow them
COUNT, FINISHED, ARRIVALS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def down_kernel(x1_ptr, index_ptr, state_ptr, w_down_t_ptr, b_down_ptr, acc_ptr, out_ptr, routes_ptr, B, N, D,
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

