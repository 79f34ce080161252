"""The first kernel of a sparse FFN call: the gate, the activation, the list of active neurons, W_up.

Each program owns BLOCK_N neurons. It reads their gate rows over all of K (the gate decides which
neurons are active, so it is the one dense read), rounds the gate values to the input dtype and
applies the activation as transformers does, then reads the W_up rows of the neurons active for
any token of the batch (masked loads of inactive rows touch no memory). It appends its active
neurons to a compact list with one atomic per program and stores x1 = act(gate) * up at the
neurons' own columns (zero for inactive ones). Non-gated FFNs (GPT-2, GPT-NeoX, Falcon) stop after
act(x W_up^T).
"""

from __future__ import annotations

import triton
import triton.language as tl

# activation codes shared with the Python side (relufy.activations family names)
RELU, FATRELU, SHIFTED_RELU, RELU2 = 0, 1, 2, 3
ACTIVATION_CODES = {"relu": RELU, "fatrelu": FATRELU, "shifted_relu": SHIFTED_RELU, "relu2": RELU2}


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
def rows_times_x(x_ptr, w_ptr, rows, row_mask, batch, batch_ok, K, k_end, BLOCK_B: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_B, BLOCK_N] fp32: x (B x K) times the weight rows `rows` over K in [0, k_end).

    Masked rows are not read (an up projection passes k_end = 0 to skip a block with no active
    row). Without tensor cores the products are summed elementwise across the loop and reduced over
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
def first_projection_kernel(x_ptr, w_first_ptr, w_up_ptr, b_first_ptr, b_up_ptr, x1_ptr, index_ptr, count_ptr,
                             B, N, K, act_param, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                             DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    batch = tl.arange(0, BLOCK_B)
    batch_ok = batch < B

    first = rows_times_x(x_ptr, w_first_ptr, rows, row_ok, batch, batch_ok, K, K, BLOCK_B, BLOCK_N, BLOCK_K,
                         USE_DOT, PRECISION)
    if HAS_BIAS:
        first += tl.load(b_first_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    a = _activate(first.to(DTYPE).to(tl.float32), act_param, ACT, DTYPE)
    a = tl.where(batch_ok[:, None] & row_ok[None, :], a, 0.0)  # padded batch rows must not make a neuron active
    active = (tl.max((a != 0).to(tl.int32), axis=0) > 0) & row_ok  # the batch's union

    flags = active.to(tl.int32)
    n_active = tl.sum(flags, axis=0)
    if GATED:
        up = rows_times_x(x_ptr, w_up_ptr, rows, active, batch, batch_ok, K, tl.where(n_active > 0, K, 0),
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
    tl.store(x1_ptr + batch[:, None] * N + rows[None, :], x1, mask=batch_ok[:, None] & row_ok[None, :])
