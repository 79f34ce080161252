"""The first kernel of a sparse FFN call: the gate, the activation, the list of active neurons, W_up.

Each program owns BLOCK_N neurons. It reads their gate rows over all of K (the gate decides which
neurons are active, so it is the one dense read), rounds the gate values to the input dtype and
applies the activation as transformers does, then reads the W_up rows of the neurons active for
any token of the batch (masked loads of inactive rows touch no memory). It appends its active
neurons to a compact list with one atomic per program and stores x1 = act(gate) * up at the
neurons' own columns (zero for inactive ones). Non-gated FFNs (GPT-2, GPT-NeoX, Falcon) stop after
act(x W_up^T).

`persistent_first_projection_kernel` does the same work with a fixed grid (`Tiles.first_programs`,
off in today's rows): each program walks row blocks and K steps in one software-pipelined loop, so
the next tiles' gate rows are in flight during each block's activation, W_up rows and append.

With LAUNCH_DEPENDENTS (`Tiles.dependent_launch`) each program first lets the second kernel, launched as a
programmatic dependent, be placed on the GPU: once every program has started, the second kernel's programs
take the multiprocessors this one leaves free and wait there (`gdc_wait`) until it has finished and its
writes are visible. Its launch then overlaps this kernel's last programs instead of following them.
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
                             BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                             APPEND_SEM: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr):
    """One program per block of BLOCK_N neurons: their gate sums, then `finish_rows`. APPEND_SEM is the
    list append's memory order (`Tiles.relaxed_append`)."""
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    batch = tl.arange(0, BLOCK_B)
    batch_ok = batch < B

    first = rows_times_x(x_ptr, w_first_ptr, rows, row_ok, batch, batch_ok, K, K, BLOCK_B, BLOCK_N, BLOCK_K,
                         USE_DOT, PRECISION)
    finish_rows(first, x_ptr, w_up_ptr, b_first_ptr, b_up_ptr, x1_ptr, index_ptr, count_ptr, rows, row_ok, batch,
                batch_ok, N, K, act_param, GATED, HAS_BIAS, ACT, DTYPE, BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, PRECISION,
                APPEND_SEM)


@triton.jit
def finish_rows(first, x_ptr, w_up_ptr, b_first_ptr, b_up_ptr, x1_ptr, index_ptr, count_ptr, rows, row_ok, batch,
                batch_ok, N, K, act_param, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                USE_DOT: tl.constexpr, PRECISION: tl.constexpr, APPEND_SEM: tl.constexpr):
    """Everything after the gate sums `first` ([BLOCK_B, BLOCK_N] fp32) of neurons `rows`: the bias,
    the activation, the W_up rows of the active neurons, their append to the list (one atomic with
    `APPEND_SEM`), x1."""
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

    # append these rows' active neurons to the compact list: one atomic
    base = tl.atomic_add(count_ptr, n_active, mask=n_active > 0, sem=APPEND_SEM)
    slots = base + tl.cumsum(flags, axis=0) - 1
    tl.store(index_ptr + slots, rows, mask=active)
    tl.store(x1_ptr + batch[:, None] * N + rows[None, :], x1, mask=batch_ok[:, None] & row_ok[None, :])


@triton.jit
def persistent_first_projection_kernel(x_ptr, w_first_ptr, w_up_ptr, b_first_ptr, b_up_ptr, x1_ptr, index_ptr,
                                        count_ptr, B, N, K, act_param, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                                        ACT: tl.constexpr, DTYPE: tl.constexpr, BLOCK_B: tl.constexpr,
                                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                                        PRECISION: tl.constexpr, STAGES: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr):
    """`first_projection_kernel` on a fixed grid of P programs (`Tiles.first_programs`): program p takes
    row blocks p, p + P, p + 2P, ... and walks their (block, K step) tiles in one loop that Triton
    software-pipelines over STAGES stages. The gate rows of the next STAGES - 1 tiles are copied to
    shared memory (cp.async) while this one is summed, across block ends too, so they are in flight
    while a block is finished (activation, W_up rows of its active neurons, append, x1). Each block's
    arithmetic is `first_projection_kernel`'s with the same tiles, so x1 and the list are the same up to
    fp32 summation order (bit-identical under the interpreter; compiled code may order a block's sums
    otherwise, which can flip a neuron whose gate is at the activation threshold), the list's order
    aside, which varies from launch to launch in both and which no reader relies on.

    Why: at one token on an H200 the first kernel reads at 70% of copy bandwidth (cuBLAS's GEMV: 88%;
    the same kernel on an H100: 85%), whatever its tiles. A faster memory needs more bytes in flight
    per multiprocessor (Little's law). One program per block has one K step of gate rows in flight, in
    registers (Triton pipelines a plain loop's loads only when they feed tensor-core dots;
    `tl.range(..., num_stages=S)` pipelines these too), and a block's dependent tail (W_up rows after
    the gate, an acquire-release append) has little. Here the steps in flight wait in shared memory,
    and a block's tail overlaps the next block's gate rows. The append is relaxed: only the next launch reads the
    list and the count, and the launch boundary orders them. `first_projection_kernel` keeps its
    acquire-release append unless a row sets `relaxed_append`: the sweep's control for the append's
    share of a persistent row's gain.
    STAGES = 1: the persistent grid alone.
    """
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    batch = tl.arange(0, BLOCK_B)
    batch_ok = batch < B
    steps = tl.cdiv(K, BLOCK_K)
    # this program's row blocks (the grid has at most one program per block)
    blocks = tl.cdiv(tl.cdiv(N, BLOCK_N) - tl.program_id(0), tl.num_programs(0))
    if USE_DOT:
        first = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:
        partial = tl.zeros((BLOCK_B, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for tile in tl.range(0, blocks * steps, num_stages=STAGES):
        rows = (tl.program_id(0) + (tile // steps) * tl.num_programs(0)) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        ks = (tile % steps) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + batch[:, None] * K + ks[None, :], mask=batch_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_first_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if USE_DOT:
            first += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        else:  # as `rows_times_x`: elementwise sums across the K steps, reduced over K once per block
            partial += x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32)
        if tile % steps == steps - 1:  # the block's last K step
            if not USE_DOT:
                first = tl.sum(partial, axis=2)
            finish_rows(first, x_ptr, w_up_ptr, b_first_ptr, b_up_ptr, x1_ptr, index_ptr, count_ptr, rows, row_ok,
                        batch, batch_ok, N, K, act_param, GATED, HAS_BIAS, ACT, DTYPE, BLOCK_B, BLOCK_N, BLOCK_K,
                        USE_DOT, PRECISION, "relaxed")
            if USE_DOT:
                first = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            else:
                partial = tl.zeros((BLOCK_B, BLOCK_N, BLOCK_K), dtype=tl.float32)
