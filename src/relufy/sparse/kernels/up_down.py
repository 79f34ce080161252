"""The second kernel of a gated sparse FFN call "up in down": W_up and W_down^T rows of a list slice.

Selected per tile table row (`Tiles.up_in_down`). The first kernel then reads only the gate (it
runs as for a non-gated FFN and stores act(gate) at each neuron's column), a pure streaming read
with no dependent phase. This kernel's SPLIT programs each take a slice of the list of active
neurons (or of all N rows, on the dense route: W_up and W_down^T are then read in full, as a dense
FFN reads them). A program reads its neurons' W_up rows (K wide), computes up = x W_up^T + b_up and
x1 = act(gate) * up with the rounding of the two-kernel path (up rounded to the input dtype, then
the product), and adds x1 times the neurons' W_down^T rows (D wide, contiguous) to the workspace
sums with relaxed fp32 atomics, column block by column block. A slice of at most CHUNK neurons
(the case the tiles are chosen for) is one step: one list load, then the first column block of
the down rows and the up rows in flight together, the products kept in registers. A longer slice
stores its products over act(gate) and walks the down rows as `down_kernel` does.

Every program covers every column, so there is one arrival counter: the last program to arrive
writes all outputs (bias, x's dtype) and leaves the workspace zero, as `down_kernel`'s finishers
do per column block. The point is more bytes in flight per program in the latency-bound part: a
program's up and down rows, not only down rows after a first kernel whose up read waits on its
gate read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .down import ARRIVALS, COUNT, column_sums, share_of_rows, slot_rows
from .gate_up import rows_times_x


@triton.jit
def up_down_kernel(x_ptr, w_up_ptr, b_up_ptr, x1_ptr, index_ptr, state_ptr, w_down_t_ptr, b_down_ptr, acc_ptr,
                   out_ptr, routes_ptr, B, N, K, D, dense_above, SPLIT: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_ROUTES: tl.constexpr, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                   AFTER_FIRST: tl.constexpr):
    if AFTER_FIRST:  # launched as the first kernel's programmatic dependent: wait for its results (as `down_kernel`)
        tl.extra.cuda.gdc_wait()
    dense, start, end, listed_end = share_of_rows(state_ptr, N, dense_above, SPLIT)
    batch = tl.arange(0, BLOCK_B)
    batch_ok = batch < B
    if HAS_ROUTES:  # one count per call: calls that took the sparse route, calls that took the dense one
        tl.atomic_add(routes_ptr + dense.to(tl.int32), 1, mask=tl.program_id(0) == 0, sem="relaxed")

    if end - start <= CHUNK:  # one step: no products through memory
        _one_step(x_ptr, w_up_ptr, b_up_ptr, x1_ptr, index_ptr, w_down_t_ptr, acc_ptr, start, end, listed_end, dense,
                  batch, batch_ok, N, K, D, HAS_UP_BIAS, BLOCK_B, CHUNK, BLOCK_K, BLOCK_D, USE_DOT, PRECISION)
    else:
        _walk(x_ptr, w_up_ptr, b_up_ptr, x1_ptr, index_ptr, w_down_t_ptr, acc_ptr, start, end, listed_end, dense,
              batch, batch_ok, N, K, D, HAS_UP_BIAS, BLOCK_B, CHUNK, BLOCK_K, BLOCK_D, USE_DOT, PRECISION)
    _finish_every_column(state_ptr, b_down_ptr, acc_ptr, out_ptr, batch, batch_ok, D, SPLIT, HAS_BIAS, BLOCK_B,
                         BLOCK_D)


@triton.jit
def _one_step(x_ptr, w_up_ptr, b_up_ptr, x1_ptr, index_ptr, w_down_t_ptr, acc_ptr, start, end, listed_end, dense,
              batch, batch_ok, N, K, D, HAS_UP_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr,
              BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """A share of at most CHUNK slots: one list load, then the first column block of their W_down^T
    rows loaded before their W_up rows, so both are in flight together; the products stay in
    registers. The other column blocks follow one load each."""
    slots = start + tl.arange(0, CHUNK)
    ok = slots < end
    rows = slot_rows(index_ptr, slots, listed_end, dense)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < tl.where(start < end, D, 0)  # a program with no share adds nothing
    w = tl.load(w_down_t_ptr + rows[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
    x1 = _products(x_ptr, w_up_ptr, b_up_ptr, x1_ptr, rows, ok, batch, batch_ok, N, K, HAS_UP_BIAS, BLOCK_B, CHUNK,
                   BLOCK_K, USE_DOT, PRECISION)
    _add_down(acc_ptr, x1, w, batch, batch_ok, cols, col_ok, D, BLOCK_B, USE_DOT, PRECISION)
    for c0 in range(BLOCK_D, tl.where(start < end, D, 0), BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        w = tl.load(w_down_t_ptr + rows[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        _add_down(acc_ptr, x1, w, batch, batch_ok, cols, col_ok, D, BLOCK_B, USE_DOT, PRECISION)


@triton.jit
def _add_down(acc_ptr, x1, w, batch, batch_ok, cols, col_ok, D, BLOCK_B: tl.constexpr, USE_DOT: tl.constexpr,
              PRECISION: tl.constexpr):
    """Adds x1 (tokens x rows, input dtype) times `w` (rows x columns) to the sums of columns `cols`,
    the products as `down.py` forms them (fp32 broadcast products, or a tensor-core dot)."""
    if BLOCK_B == 1:
        acc = tl.sum(w.to(tl.float32) * tl.trans(x1.to(tl.float32)), axis=0)[None, :]
    elif USE_DOT:
        acc = tl.dot(x1, w, input_precision=PRECISION)
    else:
        acc = tl.sum(x1[:, :, None].to(tl.float32) * w[None, :, :].to(tl.float32), axis=1)
    # relaxed: no fence per add; the barrier and the arrival's release in the finisher order them all at once
    tl.atomic_add(acc_ptr + batch[:, None] * D + cols[None, :], acc, mask=batch_ok[:, None] & col_ok[None, :],
                  sem="relaxed")


@triton.jit
def _walk(x_ptr, w_up_ptr, b_up_ptr, x1_ptr, index_ptr, w_down_t_ptr, acc_ptr, start, end, listed_end, dense,
          batch, batch_ok, N, K, D, HAS_UP_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr,
          BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """A share of more than CHUNK slots (the dense route, or a list longer than the tiles expect): the
    products of every step stored over act(gate), then W_down^T walked per column block as
    `down_kernel` walks it, one set of atomic adds per column block."""
    for p0 in range(start, end, CHUNK):
        slots = p0 + tl.arange(0, CHUNK)
        ok = slots < end
        rows = slot_rows(index_ptr, slots, listed_end, dense)
        x1 = _products(x_ptr, w_up_ptr, b_up_ptr, x1_ptr, rows, ok, batch, batch_ok, N, K, HAS_UP_BIAS, BLOCK_B,
                       CHUNK, BLOCK_K, USE_DOT, PRECISION)
        tl.store(x1_ptr + batch[:, None] * N + rows[None, :], x1, mask=batch_ok[:, None] & ok[None, :])
    tl.debug_barrier()  # the products this program stored, visible to all of its threads
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        acc = column_sums(x1_ptr, index_ptr, w_down_t_ptr, start, end, listed_end, dense, cols, col_ok, batch,
                          batch_ok, N, D, BLOCK_B, CHUNK, BLOCK_D, USE_DOT, PRECISION)
        tl.atomic_add(acc_ptr + batch[:, None] * D + cols[None, :], acc, mask=batch_ok[:, None] & col_ok[None, :],
                      sem="relaxed")


@triton.jit
def _products(x_ptr, w_up_ptr, b_up_ptr, x1_ptr, rows, ok, batch, batch_ok, N, K, HAS_UP_BIAS: tl.constexpr,
              BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
              PRECISION: tl.constexpr):
    """x1 = act(gate) * (x W_up^T + b_up) of neurons `rows` (tokens x rows, input dtype), act(gate) read
    where the first kernel stored it. Rounded as the first kernel rounds it on the two-kernel path:
    up to the input dtype, then the product to it (act(gate) is already exact in that dtype)."""
    # act(gate) and the bias first: their loads are in flight with the W_up rows, not after them
    a = tl.load(x1_ptr + batch[:, None] * N + rows[None, :], mask=batch_ok[:, None] & ok[None, :], other=0.0)
    if HAS_UP_BIAS:
        bias = tl.load(b_up_ptr + rows, mask=ok, other=0.0).to(tl.float32)[None, :]
    up = rows_times_x(x_ptr, w_up_ptr, rows, ok, batch, batch_ok, K, K, BLOCK_B, CHUNK, BLOCK_K, USE_DOT, PRECISION)
    if HAS_UP_BIAS:
        up += bias
    dtype = x1_ptr.dtype.element_ty
    return (a.to(tl.float32) * up.to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def _finish_every_column(state_ptr, b_down_ptr, acc_ptr, out_ptr, batch, batch_ok, D, SPLIT: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The last of the SPLIT programs to arrive reads every sum, zeroes it, adds the bias and writes
    the output, then resets the arrival counter and the count, so the workspace is zero when the
    launch ends. Ordering as in `down.py`'s `_finish_column_block`: relaxed adds, the CTA barrier,
    one acquire-release arrival, sums read back with atomics at L2."""
    tl.debug_barrier()
    arrived = tl.atomic_add(state_ptr + ARRIVALS, 1, sem="acq_rel")
    last = arrived == SPLIT - 1
    zeros = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, tl.where(last, D, 0), BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        tile = batch[:, None] * D + cols[None, :]
        mask = batch_ok[:, None] & col_ok[None, :]
        total = tl.atomic_add(acc_ptr + tile, zeros, mask=mask, sem="relaxed")
        tl.store(acc_ptr + tile, zeros, mask=mask)
        if HAS_BIAS:
            total += tl.load(b_down_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(state_ptr + ARRIVALS, 0, mask=last)  # every program has arrived
    tl.store(state_ptr + COUNT, 0, mask=last)  # every program has read it: each arrived after reading
