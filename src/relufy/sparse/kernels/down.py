"""The second kernel of a sparse FFN call: W_down over the list of active neurons (or every row).

SPLIT x (D / BLOCK_D) programs; each reads the list's length on the device and walks its share of
the list CHUNK rows at a time, accumulating x1[:, i] * W_down^T[i, cols] from a row-major copy of
W_down^T (each neuron is one contiguous row), then adds its partial sum atomically (fp32). When
more than `dense_above` neurons are active it walks all N rows in order instead (the dense route:
no list, no gather). The last program of each column block adds the bias and writes the output in
x's dtype; the kernels leave their workspace zero for the next call.

At decode the kernel reads few bytes (at one token, ~10% of W_down), so its time is a chain of
memory round trips, not bandwidth. Each step of a program's walk is two dependent loads (list
entries, then their weight rows), so a share of at most CHUNK rows is one index load and one wave
of weight loads all in flight together. The partial sums are relaxed atomics; a program's one
fence is its arrival in the finishing protocol (see `_finish_column_block`).

Launched as a programmatic dependent of the first kernel (AFTER_FIRST, `Tiles.dependent_launch`), each
program waits on the device (`gdc_wait`) before its first memory access: every word it reads (the
count, the list, x1) and the workspace it writes belong to the first kernel until that kernel ends.
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
                 PRECISION: tl.constexpr, AFTER_FIRST: tl.constexpr):
    if AFTER_FIRST:
        tl.extra.cuda.gdc_wait()
    dense, start, end, listed_end = share_of_rows(state_ptr, N, dense_above, SPLIT)
    column_block = tl.program_id(1)
    cols = column_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    batch = tl.arange(0, BLOCK_B)
    batch_ok = batch < B
    if HAS_ROUTES:  # one count per call: calls that took the sparse route, calls that took the dense one
        tl.atomic_add(routes_ptr + dense.to(tl.int32), 1, mask=(tl.program_id(0) == 0) & (column_block == 0),
                      sem="relaxed")

    acc = column_sums(x1_ptr, index_ptr, w_down_t_ptr, start, end, listed_end, dense, cols, col_ok, batch, batch_ok,
                      N, D, BLOCK_B, CHUNK, BLOCK_D, USE_DOT, PRECISION)
    tile = batch[:, None] * D + cols[None, :]
    written = cols < tl.where(start < end, D, 0)  # a program with no share adds nothing
    # relaxed: no fence per add; the barrier and the arrival's release below order them all at once
    tl.atomic_add(acc_ptr + tile, acc, mask=batch_ok[:, None] & written[None, :], sem="relaxed")
    _finish_column_block(state_ptr, b_down_ptr, acc_ptr, out_ptr, tile, cols, col_ok, batch_ok, column_block, D,
                         SPLIT, HAS_BIAS, BLOCK_B, BLOCK_D)


@triton.jit
def column_sums(x1_ptr, index_ptr, w_down_t_ptr, start, end, listed_end, dense, cols, col_ok, batch, batch_ok, N, D,
                BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr,
                PRECISION: tl.constexpr):
    """[BLOCK_B, BLOCK_D] fp32: the sums over slots [start, end) of x1[:, i] * W_down^T[i, cols]."""
    if BLOCK_B == 1:
        acc = _one_token_sum(x1_ptr, index_ptr, w_down_t_ptr, start, end, listed_end, dense, cols, col_ok, D,
                             CHUNK, BLOCK_D)[None, :]
    else:
        acc = _tokens_sum(x1_ptr, index_ptr, w_down_t_ptr, start, end, listed_end, dense, cols, col_ok, batch,
                          batch_ok, N, D, BLOCK_B, CHUNK, BLOCK_D, USE_DOT, PRECISION)
    return acc


@triton.jit
def share_of_rows(state_ptr, N, dense_above, SPLIT: tl.constexpr):
    """This program's share of the list, or of all N rows on the dense route (more than `dense_above`
    active neurons): the route, the share's slots [start, end), and the slot below which list entries
    are read (none on the dense route)."""
    count = tl.load(state_ptr + COUNT)
    dense = count > dense_above  # the dense route: every row in order, no list
    rows_total = tl.where(dense, N, count)
    share = tl.cdiv(rows_total, SPLIT)
    start = tl.program_id(0) * share
    end = tl.minimum(start + share, rows_total)
    return dense, start, end, tl.where(dense, 0, end)


@triton.jit
def slot_rows(index_ptr, slots, listed_end, dense):
    """The W_down^T rows of list slots `slots`: list entries, or the slots themselves on the dense route."""
    listed = tl.load(index_ptr + slots, mask=slots < listed_end, other=0)
    return tl.where(dense, slots, listed).to(tl.int64)


@triton.jit
def _one_token_sum(x1_ptr, index_ptr, w_down_t_ptr, start, end, listed_end, dense, cols, col_ok, D,
                   CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_D] fp32: one token's sum over slots [start, end). Two-dimensional tiles (rows x columns)
    and a sum over the rows per step, so the loaded rows need no layout change and the running sum
    is one value per column.

    Each step loads the next step's list entries along with its own weight rows (Triton pipelines
    only loads that feed tensor-core dots), so a walk of several steps waits for one round trip per
    step, not two."""
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    rows = slot_rows(index_ptr, start + tl.arange(0, CHUNK), listed_end, dense)
    for p0 in range(start, end, CHUNK):
        slots = p0 + tl.arange(0, CHUNK)
        ok = slots < end
        w = tl.load(w_down_t_ptr + rows[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        x1 = tl.load(x1_ptr + rows, mask=ok, other=0.0)
        next_rows = slot_rows(index_ptr, slots + CHUNK, listed_end, dense)  # none past the share
        acc += tl.sum(w.to(tl.float32) * x1.to(tl.float32)[:, None], axis=0)
        rows = next_rows
    return acc


@triton.jit
def _tokens_sum(x1_ptr, index_ptr, w_down_t_ptr, start, end, listed_end, dense, cols, col_ok, batch, batch_ok, N, D,
                BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr,
                PRECISION: tl.constexpr):
    """[BLOCK_B, BLOCK_D] fp32: several tokens' sums over slots [start, end), by tensor-core dots or
    by broadcast products summed over the chunk rows once, after the loop."""
    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    else:
        partial = tl.zeros((BLOCK_B, CHUNK, BLOCK_D), dtype=tl.float32)
    for p0 in range(start, end, CHUNK):
        slots = p0 + tl.arange(0, CHUNK)
        ok = slots < end
        rows = slot_rows(index_ptr, slots, listed_end, dense)
        w = tl.load(w_down_t_ptr + rows[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        x1 = tl.load(x1_ptr + batch[:, None] * N + rows[None, :], mask=batch_ok[:, None] & ok[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(x1, w, input_precision=PRECISION)
        else:
            partial += x1[:, :, None].to(tl.float32) * w[None, :, :].to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(partial, axis=1)
    return acc


@triton.jit
def _finish_column_block(state_ptr, b_down_ptr, acc_ptr, out_ptr, tile, cols, col_ok, batch_ok, column_block, D,
                         SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The last of the SPLIT programs of this column block finishes it: it reads the sums, zeroes them,
    adds the bias and writes the output; the last finisher of all resets the count, so the workspace
    is zero when the launch ends.

    Ordering, as CUDA's grid barrier does it: every thread's relaxed adds, then the CTA barrier, then
    one thread's arrival with release (and acquire) semantics at GPU scope, which publishes the whole
    CTA's adds. The finisher reads the sums with atomics (adding zero), which are performed at L2
    after that acquire: a plain load missed other programs' adds now and then on an H200 (wrong rows
    in about half of the 4-token calls against a dense FFN). Its read-back and its count of finished
    column blocks are relaxed and independent, so their round trips overlap. (Triton's CPU
    interpreter has no fp32 atomic exchange.)
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(state_ptr + ARRIVALS + column_block, 1, sem="acq_rel")
    last = arrived == SPLIT - 1
    finishing = batch_ok[:, None] & (cols < tl.where(last, D, 0))[None, :]
    zeros = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    total = tl.atomic_add(acc_ptr + tile, zeros, mask=finishing, sem="relaxed")
    finishers = tl.atomic_add(state_ptr + FINISHED, 1, mask=last, sem="relaxed")
    finished = last & (finishers == tl.num_programs(1) - 1)  # every column block is written
    tl.store(acc_ptr + tile, zeros, mask=finishing)
    if HAS_BIAS:
        total += tl.load(b_down_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=finishing)
    tl.store(state_ptr + ARRIVALS + column_block, 0, mask=last)  # every program of the block has arrived
    tl.store(state_ptr + COUNT, 0, mask=finished)  # every program has read it: each arrived after reading
    tl.store(state_ptr + FINISHED, 0, mask=finished)
