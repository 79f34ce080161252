"""The sparse FFN kernels against a dense FFN, on CPU under Triton's interpreter and natively on CUDA.

Triton's CPU interpreter rounds float32 to bfloat16 toward zero and mis-multiplies bfloat16 in
`tl.dot` (neither happens on a GPU), so on CPU bfloat16 runs the broadcast-and-sum tiles and is
held to a looser bound; float32 and float16 are checked on every tile path.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from relufy.sparse.kernels import (  # noqa: E402
    ACTIVATION_CODES, FATRELU, NARROW_TILE_TABLE, NARROW_WIDTH, RELU, SHIFTED_RELU, TILE_TABLE, Tiles, choose_tiles,
    gpu_family, gpu_tiles, row_tiles, sparse_ffn, table_row, workspace_size)

DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu")
ON_INTERPRETER = DEVICE.type == "cpu"
PARAMS = {"relu": 0.0, "fatrelu": 0.25, "shifted_relu": 0.1, "relu2": 0.0}
# both ways of running a gated FFN: W_up in the first kernel (today's tiles), or in the second ("up in down")
BOTH_PATHS = pytest.mark.parametrize("up_in_down", [False, True])


def tiles_for(batch, n, d, up_in_down, tiles=None):
    """`tiles` (default: the interpreter's for this batch); with `up_in_down`, the variant on a table row
    that gives it 3 list slices (fewer programs than active neurons, so each walks several)."""
    tiles = tiles or choose_tiles(batch, n, d, DEVICE)
    if not up_in_down:
        return tiles
    row = {**table_row("H200", batch), "up_in_down": True, "down_per_sm": 0.75}
    variant = row_tiles(row, batch, d, multiprocessors=4)
    return dataclasses.replace(tiles, up_in_down=True, split=variant.split)


def dense_ffn(x, w_first, w_up, w_down_t, activation, param, b_first=None, b_up=None, b_down=None):
    """The FFN as transformers computes it: projections rounded to x's dtype, then the activation."""
    linear = torch.nn.functional.linear
    g = linear(x, w_first, b_first)
    if activation == "relu":
        a = torch.relu(g)
    elif activation == "fatrelu":
        a = g.masked_fill(g < param, 0)
    elif activation == "shifted_relu":
        a = torch.relu(g - param)
    else:
        a = torch.square(torch.relu(g))
    x1 = a * linear(x, w_up, b_up) if w_up is not None else a
    return linear(x1, w_down_t.t(), b_down)


def random_ffn(batch, k=64, n=96, d=48, dtype=torch.float32, gated=True, bias=False, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype)

    x = rand(batch, k)
    weights = dict(w_first=rand(n, k, scale=k ** -0.5), w_up=rand(n, k, scale=k ** -0.5) if gated else None,
                   w_down_t=rand(n, d, scale=n ** -0.5))
    if bias:
        weights.update(b_first=rand(n, scale=0.1), b_up=rand(n, scale=0.1) if gated else None, b_down=rand(d, scale=0.1))
    return x, weights


def relative_error(result, reference):
    return float((result.double() - reference.double()).norm() / reference.double().norm())


def bound(dtype) -> float:
    if dtype == torch.float32:
        return 1e-5
    if dtype == torch.bfloat16 and ON_INTERPRETER:
        return 6e-2
    return 1e-2


def check(x, weights, activation, dtype, tiles=None, up_in_down=False):
    """Float32 against a float64 FFN; half precision against the dense FFN in the same dtype, as
    transformers runs it (a neuron whose gate rounds across a FATReLU threshold differs in both)."""
    param = PARAMS[activation]
    names = ("w_first", "w_up", "w_down_t", "b_first", "b_up", "b_down")
    tensors = [weights.get(name) for name in names]
    if tiles is None and ON_INTERPRETER and dtype == torch.bfloat16:  # the interpreter's bf16 tl.dot is wrong
        tiles = dataclasses.replace(choose_tiles(1, 96, 48, DEVICE), block_b=triton.next_power_of_2(x.shape[0]))
    tiles = tiles_for(x.shape[0], *weights["w_down_t"].shape, up_in_down, tiles)
    sparse = sparse_ffn(x, *tensors[:3], ACTIVATION_CODES[activation], param, *tensors[3:], tiles=tiles)
    precise = torch.float64 if dtype == torch.float32 else dtype
    cast = [None if t is None else t.to(precise) for t in tensors]
    reference = dense_ffn(x.to(precise), *cast[:3], activation, param, *cast[3:])
    assert sparse.dtype == x.dtype and sparse.shape == (x.shape[0], weights["w_down_t"].shape[1])
    assert torch.isfinite(sparse).all()
    assert relative_error(sparse, reference) <= bound(dtype)
    return sparse


@pytest.mark.parametrize("activation", list(PARAMS))
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@BOTH_PATHS
def test_every_activation_matches_the_dense_ffn_in_float32(activation, gated, batch, up_in_down):
    """Non-gated FFNs with `up_in_down` tiles take the two-kernel path (there is no W_up to move)."""
    x, weights = random_ffn(batch, gated=gated)
    check(x, weights, activation, torch.float32, up_in_down=up_in_down)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@BOTH_PATHS
def test_half_precision_inputs_accumulate_in_float32(dtype, batch, up_in_down):
    x, weights = random_ffn(batch, dtype=dtype)
    check(x, weights, "fatrelu", dtype, up_in_down=up_in_down)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensor_core_tiles_for_larger_batches(dtype):
    x, weights = random_ffn(6, dtype=dtype)
    tiles = choose_tiles(6, 96, 48, DEVICE)
    assert tiles.use_dot
    check(x, weights, "relu", dtype, tiles)


@pytest.mark.parametrize("table, family", [(TILE_TABLE, family) for family in sorted(TILE_TABLE)]
                         + [(NARROW_TILE_TABLE, family) for family in sorted(NARROW_TILE_TABLE)])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_the_tiles_an_h100_and_an_h200_run(table, family, batch):
    """Each GPU's own block sizes and split (132 multiprocessors), not the interpreter's larger blocks:
    every family's rows, and its rows for narrow FFNs."""
    x, weights = random_ffn(batch, k=200, n=300, d=136)
    row = table_row_of(table[family], batch)
    check(x, weights, "fatrelu", torch.float32, row_tiles(row, batch, 136, multiprocessors=132))


# (block_d, chunk, split) of the down kernel: many column blocks and several steps per share; a share
# that fits one step (one index load, every row in flight at once); one column block wider than D; one
# program per narrow column block with long steps
DOWN_TILES = [(16, 16, 5), (64, 64, 4), (256, 32, 1), (16, 64, 1)]


@pytest.mark.parametrize("block_d, chunk, split", DOWN_TILES)
@pytest.mark.parametrize("dense_above, route", [(None, 0), (0, 1)])
@pytest.mark.parametrize("batch, use_dot", [(1, False), (5, False), (5, True)])
@BOTH_PATHS
def test_down_kernel_tiles_match_the_dense_ffn(block_d, chunk, split, dense_above, route, batch, use_dot, up_in_down):
    """Every down-kernel path (one token; several by broadcast or tensor cores) with the tiles a sweep
    tries, on the list and on the dense route, at an odd width; the workspace is left zero. With
    `up_in_down`, `split` list slices each read their W_up rows too, `block_d` columns per step."""
    x, weights = random_ffn(batch, k=72, n=203, d=150, bias=True, seed=batch + split)
    tensors = [weights[name] for name in ("w_first", "w_up", "w_down_t", "b_first", "b_up", "b_down")]
    base = choose_tiles(batch, 203, 150, DEVICE)
    tiles = dataclasses.replace(base, use_dot=use_dot, block_b=max(16 if use_dot else 1, triton.next_power_of_2(batch)),
                                block_d=block_d, chunk=chunk, split=split, up_in_down=up_in_down)
    workspace = torch.zeros(workspace_size(batch, 203, 150), dtype=torch.int32, device=DEVICE)
    routes = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    poison_allocator(DEVICE)
    out = sparse_ffn(x, *tensors[:3], RELU, 0.0, *tensors[3:], workspace=workspace, tiles=tiles,
                     dense_above=dense_above, routes=routes)
    reference = dense_ffn(x.double(), *(t.double() for t in tensors[:3]), "relu", 0.0,
                          *(t.double() for t in tensors[3:]))
    assert routes.tolist() == [1 - route, route]
    assert relative_error(out, reference) <= 1e-5
    assert not workspace.any()


@pytest.mark.skipif(ON_INTERPRETER, reason="bfloat16 tl.dot is wrong in Triton's CPU interpreter, right on GPUs")
def test_tensor_core_tiles_in_bfloat16_on_cuda():
    x, weights = random_ffn(16, k=256, n=512, d=256, dtype=torch.bfloat16)
    check(x, weights, "relu", torch.bfloat16)


@pytest.mark.parametrize("gated", [True, False])
@BOTH_PATHS
def test_biases_of_gpt_style_ffns(gated, up_in_down):
    x, weights = random_ffn(2, gated=gated, bias=True)
    check(x, weights, "relu", torch.float32, up_in_down=up_in_down)


@BOTH_PATHS
def test_shapes_that_fit_no_tile(up_in_down):
    x, weights = random_ffn(5, k=72, n=101, d=37)
    check(x, weights, "shifted_relu", torch.float32, up_in_down=up_in_down)


@BOTH_PATHS
def test_all_zero_activations_give_the_bias_alone(up_in_down):
    x, weights = random_ffn(3, bias=True)
    weights["b_first"] = torch.full_like(weights["b_first"], -1e3)  # every gate negative
    out = check(x, weights, "relu", torch.float32, up_in_down=up_in_down)
    assert torch.equal(out, weights["b_down"].expand_as(out))


@BOTH_PATHS
def test_all_active_neurons(up_in_down):
    x, weights = random_ffn(2)
    weights["w_first"] = torch.zeros_like(weights["w_first"])  # gate = bias = 1 everywhere
    weights["b_first"] = torch.ones(96, device=DEVICE)
    weights["b_up"] = torch.zeros(96, device=DEVICE)
    weights["b_down"] = torch.zeros(48, device=DEVICE)
    check(x, weights, "relu", torch.float32, up_in_down=up_in_down)


@BOTH_PATHS
def test_fatrelu_keeps_values_at_the_threshold_and_drops_those_below(up_in_down):
    """Small integers make every sum exact in any order, so a gate value sits exactly at t."""
    generator = torch.Generator().manual_seed(1)
    x, w_gate, w_up, w_down_t = (torch.randint(-3, 4, shape, generator=generator).float().to(DEVICE)
                                 for shape in [(1, 64), (96, 64), (96, 64), (96, 48)])
    gate = torch.nn.functional.linear(x, w_gate)
    threshold = float(gate.flatten().sort().values[60])
    assert (gate == threshold).any() and (gate == threshold - 1).any()
    out = sparse_ffn(x, w_gate, w_up, w_down_t, FATRELU, threshold, tiles=tiles_for(1, 96, 48, up_in_down))
    expected = (gate * (gate >= threshold) * torch.nn.functional.linear(x, w_up)) @ w_down_t
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype,threshold", [(torch.bfloat16, 1.003), (torch.float16, 1.0003)])
def test_a_threshold_the_dtype_cannot_hold_keeps_what_the_dense_fatrelu_keeps(dtype, threshold):
    """Every gate is exactly 1.0 and t a little above it, which the dtype rounds to 1.0: torch's `x < t` compares
    with the rounded t and keeps every gate, and so must the kernels."""
    x = torch.zeros(1, 16, dtype=dtype, device=DEVICE)
    x[0, 0] = 1
    w_gate = torch.zeros(32, 16, dtype=dtype, device=DEVICE)
    w_gate[:, 0] = 1
    w_up = torch.ones(32, 16, dtype=dtype, device=DEVICE)
    w_down_t = torch.eye(32, 16, dtype=dtype, device=DEVICE)
    gate = x @ w_gate.T
    expected = (gate.masked_fill(gate < threshold, 0) * (x @ w_up.T)) @ w_down_t
    assert expected.abs().sum() > 0
    assert torch.equal(sparse_ffn(x, w_gate, w_up, w_down_t, FATRELU, threshold), expected)


@pytest.mark.parametrize("batch", [1, 6])
def test_one_workspace_serves_many_calls_and_is_left_zero(batch):
    """Calls of several sizes share a workspace; none sees another's active neurons or sums."""
    x, weights = random_ffn(batch, bias=True)
    workspace = torch.zeros(workspace_size(8, 96, 48), dtype=torch.int32, device=DEVICE)
    tensors = [weights[name] for name in ("w_first", "w_up", "w_down_t")]
    biases = [weights[name] for name in ("b_first", "b_up", "b_down")]
    outputs = []
    for inputs in (x, -x, x[:1]):
        outputs.append(sparse_ffn(inputs, *tensors, RELU, 0.0, *biases, workspace=workspace))
        assert relative_error(outputs[-1], dense_ffn(inputs, *tensors, "relu", 0.0, *biases)) <= 1e-5
        assert not workspace.any()
    assert not torch.allclose(outputs[0], outputs[1])


def test_a_small_workspace_is_refused():
    x, weights = random_ffn(4)
    with pytest.raises(ValueError, match="too small"):
        sparse_ffn(x, weights["w_first"], weights["w_up"], weights["w_down_t"], RELU,
                   workspace=torch.zeros(workspace_size(2, 96, 48), dtype=torch.int32, device=DEVICE))


def poison_allocator(device, nbytes=1 << 22):
    """Fill memory the next allocations may reuse with NaN (CUDA's caching allocator hands it back to
    `torch.empty`), so an output the kernels fail to write cannot pass as right."""
    torch.full((nbytes // 4,), float("nan"), device=device)


@pytest.mark.parametrize("batch", [1, 3])
@BOTH_PATHS
def test_fresh_inputs_on_a_poisoned_allocator_match_the_dense_ffn(batch, up_in_down):
    """Fresh inputs per case, biases, an odd width, several calls on one workspace, which stays zero;
    memory the outputs may reuse holds NaN, so an output the kernels fail to write cannot pass."""
    tiles = tiles_for(batch, 101, 37, up_in_down)
    workspace = torch.zeros(workspace_size(batch, 101, 37), dtype=torch.int32, device=DEVICE)
    for seed in range(2):
        x, weights = random_ffn(batch, k=72, n=101, d=37, bias=True, seed=10 * seed + batch)
        poison_allocator(DEVICE)
        out = sparse_ffn(x, *(weights[name] for name in ("w_first", "w_up", "w_down_t")), RELU, 0.0,
                         *(weights[name] for name in ("b_first", "b_up", "b_down")), workspace=workspace, tiles=tiles)
        reference = dense_ffn(x.double(), *(weights[name].double() for name in ("w_first", "w_up", "w_down_t")),
                              "relu", 0.0, *(weights[name].double() for name in ("b_first", "b_up", "b_down")))
        assert relative_error(out, reference) <= 1e-5
        assert not workspace.any()


def test_bfloat16_on_the_tiles_of_one_token():
    """bfloat16 on the broadcast tiles (batch 1), within the dense FFN's own bf16 rounding."""
    x, weights = random_ffn(1, k=128, n=96, d=48, dtype=torch.bfloat16, seed=7)
    check(x, weights, "fatrelu", torch.bfloat16, choose_tiles(1, 96, 48, DEVICE))


@BOTH_PATHS
def test_a_union_above_the_threshold_takes_the_dense_route(up_in_down):
    """`dense_above` below the active count: the down kernel reads every row and says so in `routes`;
    at or above it, the list. Both give the dense FFN's result (`up_in_down`: the second kernel
    reads every W_up and W_down^T row on the dense route)."""
    x, weights = random_ffn(4, seed=3)
    tensors = [weights[name] for name in ("w_first", "w_up", "w_down_t")]
    union = int((torch.nn.functional.linear(x, weights["w_first"]) > 0).any(0).sum())
    assert 0 < union < 96
    reference = dense_ffn(x.double(), *(t.double() for t in tensors), "relu", 0.0)
    tiles = tiles_for(4, 96, 48, up_in_down)
    for dense_above, route in ((union - 1, 1), (union, 0), (None, 0), (-1, 1)):
        routes = torch.zeros(2, dtype=torch.int32, device=DEVICE)
        poison_allocator(DEVICE)
        out = sparse_ffn(x, *tensors, RELU, 0.0, tiles=tiles, dense_above=dense_above, routes=routes)
        assert routes.tolist() == [1 - route, route]
        assert relative_error(out, reference) <= 1e-5


def test_tiles_come_from_the_table_of_the_gpu_at_hand():
    """Both kernels' tiles come from the row of the GPU family and batch class; the down kernel's split
    spreads `down_per_sm` programs per multiprocessor over its column blocks."""
    assert gpu_family("NVIDIA H100 80GB HBM3") == "H100" and gpu_family("NVIDIA H200") == "H200"
    assert gpu_family("NVIDIA A100-SXM4-80GB") == "H200"  # not swept: the nearest swept GPU's tiles
    for family in ("H100", "H200"):
        for batch in (1, 4, 8, 16):
            tiles = gpu_tiles(batch, 4096, 132, family)
            row = table_row(family, batch)
            assert row is TILE_TABLE[family][min(b for b in TILE_TABLE[family] if batch <= b)]
            assert all(getattr(tiles, key) == value for key, value in row.items() if key != "down_per_sm")
            assert tiles.split == min(64, row["down_per_sm"] * 132 // (4096 // row["block_d"]))
            assert not tiles.up_in_down  # the default path unless a row asks for "up in down"
            assert tiles.first_programs == 0  # one first-kernel program per row block unless a row asks
            persistent = row_tiles({**row, "first_per_sm": 2}, batch, 4096, 132)
            assert persistent == dataclasses.replace(tiles, first_programs=264)
            # "up in down" programs each cover every column: `down_per_sm` list slices per multiprocessor
            variant = row_tiles({**row, "up_in_down": True, "down_per_sm": 0.5}, batch, 4096, 132)
            assert variant.up_in_down and variant.split == 66
    # fewer programs than multiprocessors (a narrow FFN's sweep candidates): a whole number of programs
    quarter = row_tiles({**table_row("H100", 1), "down_per_sm": 0.25}, 1, 576, 132)
    assert quarter.split == 6 and isinstance(quarter.split, int)  # 33 programs over 5 column blocks of 128
    # one family's rows are its own: a sweep on one GPU fills them without changing the other's
    assert all(TILE_TABLE["H100"][b] is not TILE_TABLE["H200"].get(b) for b in TILE_TABLE["H100"])


def test_narrow_ffns_take_their_own_rows_on_cuda_only(monkeypatch):
    """A width up to NARROW_WIDTH takes the family's NARROW_TILE_TABLE rows where it has them, on CUDA; a
    family without narrow rows, a wider FFN, and the CPU interpreter keep TILE_TABLE's."""
    from relufy.sparse.kernels import tiles as tiles_module

    narrow = {"H200": {1: {**TILE_TABLE["H200"][1], "block_n": 2}, 1 << 30: {**TILE_TABLE["H200"][1 << 30], "block_n": 8}}}
    monkeypatch.setattr(tiles_module, "NARROW_TILE_TABLE", narrow)  # "H100" has no narrow rows here
    monkeypatch.setattr(tiles_module, "family_and_multiprocessors", lambda device: ("H200", 132))
    for batch in (1, 4, 8):
        rows = narrow["H200"][1 if batch == 1 else 1 << 30]
        assert table_row("H200", batch, 576) is rows and table_row("H200", batch, NARROW_WIDTH) is rows
        assert table_row("H200", batch, NARROW_WIDTH + 64) is table_row("H200", batch)
        assert table_row("H100", batch, 576) is table_row("H100", batch)
        assert choose_tiles(batch, 1536, 576, torch.device("cuda")) == row_tiles(rows, batch, 576, 132)
        wide = row_tiles(table_row("H200", batch), batch, 576, 132)
        assert choose_tiles(batch, 1536, 576, torch.device("cpu")) == (
            dataclasses.replace(wide, block_n=32) if batch == 1 else wide)


def test_tiles_follow_a_row_edited_in_place(monkeypatch):
    """choose_tiles remembers the tiles of each row's contents (an eager decode call chooses them every time),
    so a row edited in the process (bench/decode_speed.py's --dependent-launch) gives the edited tiles at once."""
    row = {**TILE_TABLE["H200"][1], "warps_down": 4}
    monkeypatch.setitem(TILE_TABLE["H200"], 1, row)
    before = choose_tiles(1, 1536, 4096, torch.device("cpu"))
    assert choose_tiles(1, 1536, 4096, torch.device("cpu")) is before  # the same tiles, not rebuilt
    row["warps_down"] = 8
    assert choose_tiles(1, 1536, 4096, torch.device("cpu")) == dataclasses.replace(before, warps_down=8)


def test_a_plain_ffn_on_an_up_in_down_row_keeps_the_down_kernels_bound(monkeypatch):
    """A non-gated FFN has no W_up to read in the second kernel: it runs the two launches on such a row,
    with the split cut to MAX_SPLIT programs per column block (an "up in down" row's split counts list
    slices over the whole GPU)."""
    from relufy.sparse.kernels import launch
    from relufy.sparse.kernels.tiles import MAX_SPLIT

    x, weights = random_ffn(1, k=200, n=300, d=136, gated=False)
    row = {**TILE_TABLE["H200"][1], "up_in_down": True, "down_per_sm": 1, "block_d": 1024, "chunk": 8}
    tiles = row_tiles(row, 1, 136, multiprocessors=132)
    assert tiles.split == 132
    grids, down_kernel = [], launch.down_kernel

    class Recorded:  # the down kernel, its launch grids noted
        def __getitem__(self, grid):
            grids.append(grid)
            return down_kernel[grid]

    monkeypatch.setattr(launch, "down_kernel", Recorded())
    check(x, weights, "fatrelu", torch.float32, tiles)
    assert grids == [(MAX_SPLIT, 1)]  # one column block of 1024 covers 136


# the persistent first kernel on an FFN of 101 neurons (13 row blocks of 8, the last short) and K = 72 (3
# steps of 32, the last short): (programs, stages) of its fixed grid. Fewer programs than blocks (each
# walks 2 or 3), one program (all 13), one per block, more than blocks (the grid is cut to one per block);
# 1 stage is no pipelining
PERSISTENT = [(5, 3), (1, 2), (13, 1), (100, 4)]


def persistent_tiles(batch, programs, stages, use_dot=None):
    """Tiles of the persistent first kernel (0 programs: one per block) for 101 neurons, K = 72 and D = 40,
    the same on every device: blocks of 8 rows, 32-wide K steps, broadcast tiles up to 4 tokens and tensor
    cores above (or as `use_dot` says); the down kernel on 3 programs per column block of 16."""
    use_dot = batch > 4 if use_dot is None else use_dot
    padded = triton.next_power_of_2(batch)
    return Tiles(block_b=max(16, padded) if use_dot else padded, block_n=8, block_k=32, use_dot=use_dot, split=3,
                 chunk=16, block_d=16, stages=stages, first_programs=programs)


@pytest.mark.parametrize("activation", list(PARAMS))
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_the_persistent_first_kernel_matches_the_dense_ffn(activation, gated, batch):
    """Every activation, gated and not, with biases, one token to eight (broadcast tiles up to 4 tokens,
    tensor cores at 8), on 5 programs that each walk 2 or 3 blocks over 3 stages."""
    x, weights = random_ffn(batch, k=72, n=101, d=40, gated=gated, bias=True, seed=batch)
    check(x, weights, activation, torch.float32, persistent_tiles(batch, 5, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_persistent_first_kernel_in_half_precision_without_biases(dtype, batch):
    x, weights = random_ffn(batch, k=72, n=101, d=40, dtype=dtype, seed=batch)
    check(x, weights, "fatrelu", dtype, persistent_tiles(batch, 5, 2))


@BOTH_PATHS
def test_the_persistent_first_kernel_on_either_path(up_in_down):
    """With "up in down" the persistent kernel reads only the gate and the second kernel the W_up rows."""
    x, weights = random_ffn(2, k=72, n=101, d=40, bias=True, seed=4)
    tiles = tiles_for(2, 101, 40, up_in_down, persistent_tiles(2, 5, 3))
    assert tiles.up_in_down == up_in_down and tiles.first_programs == 5
    check(x, weights, "shifted_relu", torch.float32, tiles)


@pytest.mark.parametrize("batch, use_dot, programs, stages", [(1, False, *grid) for grid in PERSISTENT]
                         + [(5, False, 5, 3), (5, True, 5, 3), (5, True, 100, 4)])
def test_the_persistent_first_kernel_gives_the_outputs_of_one_program_per_block(batch, use_dot, programs, stages,
                                                                                 monkeypatch):
    """x1 and the list of active neurons, as the down kernel receives them, are those of one program per
    block with the same tiles (the list as a set, its order being the atomics'), with NaN where x1 may be
    allocated, and the grid is cut to one program per block; the outputs agree. Under the interpreter,
    bit for bit; compiled code may sum in another order, and one ulp can flip a neuron whose gate is at
    the threshold, so on a GPU they agree on the other neurons, x1 to rounding."""
    from relufy.sparse.kernels import launch

    x, weights = random_ffn(batch, k=72, n=101, d=40, bias=True, seed=batch + programs)
    tensors = [weights[name] for name in ("w_first", "w_up", "w_down_t", "b_first", "b_up", "b_down")]
    received, grids = [], []
    down_kernel, persistent_kernel = launch.down_kernel, launch.persistent_first_projection_kernel

    class Received:  # the down kernel, noting the first kernel's outputs it is handed
        def __getitem__(self, grid):
            def run(x1, index, workspace, *args, **kwargs):
                count = int(workspace[0])
                received.append((x1.clone(), sorted(index[:count].tolist()), count))
                return down_kernel[grid](x1, index, workspace, *args, **kwargs)
            return run

    class Persistent:  # the persistent first kernel, its launch grids noted
        def __getitem__(self, grid):
            grids.append(grid)
            return persistent_kernel[grid]

    monkeypatch.setattr(launch, "down_kernel", Received())
    monkeypatch.setattr(launch, "persistent_first_projection_kernel", Persistent())
    outputs = []
    for first_programs in (0, programs):
        poison_allocator(DEVICE)
        tiles = persistent_tiles(batch, first_programs, stages, use_dot)
        outputs.append(sparse_ffn(x, *tensors[:3], RELU, 0.0, *tensors[3:], tiles=tiles))
    (x1, listed, count), (x1_persistent, listed_persistent, count_persistent) = received
    assert grids == [(min(programs, 13),)]
    assert count > 0 and count_persistent > 0 and torch.isfinite(x1_persistent).all()
    if ON_INTERPRETER:  # the same arithmetic in the same order
        assert (listed_persistent, count_persistent) == (listed, count) and torch.equal(x1_persistent, x1)
    else:  # neurons whose largest gate over the batch is within 1e-5 of ReLU's threshold (0) may flip
        gate = x.double() @ weights["w_first"].double().t() + weights["b_first"].double()
        clear = gate.max(0).values.abs() > 1e-5
        kept = set(clear.nonzero().flatten().tolist())
        assert kept & set(listed_persistent) == kept & set(listed)
        torch.testing.assert_close(x1_persistent[:, clear], x1[:, clear], rtol=1e-6, atol=1e-6)
    assert relative_error(outputs[1], outputs[0]) <= 1e-6


@pytest.mark.parametrize("batch", [1, 5])
def test_a_relaxed_append_gives_the_outputs_of_the_acquire_release_one(batch, monkeypatch):
    """A row's `relaxed_append` reaches the per-block first kernel as its append's memory order; only the
    next launch reads the list, so the output is the same as with today's acquire-release append."""
    from relufy.sparse.kernels import launch

    x, weights = random_ffn(batch, k=72, n=101, d=40, bias=True, seed=batch)
    tensors = [weights[name] for name in ("w_first", "w_up", "w_down_t", "b_first", "b_up", "b_down")]
    orders, first_kernel = [], launch.first_projection_kernel

    class Noted:  # the per-block first kernel, its append's memory order noted
        def __getitem__(self, grid):
            def run(*args, APPEND_SEM, **kwargs):
                orders.append(APPEND_SEM)
                return first_kernel[grid](*args, APPEND_SEM=APPEND_SEM, **kwargs)
            return run

    monkeypatch.setattr(launch, "first_projection_kernel", Noted())
    outputs = []
    for relaxed in (False, True):
        tiles = dataclasses.replace(persistent_tiles(batch, 0, 3), relaxed_append=relaxed)
        outputs.append(sparse_ffn(x, *tensors[:3], RELU, 0.0, *tensors[3:], tiles=tiles))
    assert orders == ["acq_rel", "relaxed"]
    assert relative_error(outputs[1], outputs[0]) <= (0 if ON_INTERPRETER else 1e-6)
    assert row_tiles({**table_row("H200", batch), "relaxed_append": True}, batch, 4096, 132).relaxed_append


@pytest.mark.parametrize("batch, up_in_down", [(1, False), (1, True), (5, False)])
def test_a_dependent_launch_gives_the_outputs_of_a_plain_one(batch, up_in_down, monkeypatch):
    """A row's `dependent_launch` launches the second kernel as the first's programmatic dependent where
    a compiled Hopper-or-later GPU runs them, waiting on the device for the first kernel's results, so the
    outputs are a plain launch's; the interpreter (and an older GPU) launches it plainly."""
    from relufy.sparse.kernels import launch

    x, weights = random_ffn(batch, k=72, n=101, d=40, bias=True, seed=batch)
    tensors = [weights[name] for name in ("w_first", "w_up", "w_down_t", "b_first", "b_up", "b_down")]
    launches = []

    class Noted:  # a second kernel, how it was launched noted
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append((kwargs["AFTER_FIRST"], kwargs["launch_pdl"]))
                return self.kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(launch, "down_kernel", Noted(launch.down_kernel))
    monkeypatch.setattr(launch, "up_down_kernel", Noted(launch.up_down_kernel))
    outputs = []
    for dependent in (False, True):
        tiles = dataclasses.replace(persistent_tiles(batch, 0, 3), up_in_down=up_in_down, dependent_launch=dependent)
        outputs.append(sparse_ffn(x, *tensors[:3], RELU, 0.0, *tensors[3:], tiles=tiles))
    hopper = DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE)[0] >= 9
    assert launches == [(False, False), (hopper, hopper)]
    assert relative_error(outputs[1], outputs[0]) <= (0 if ON_INTERPRETER else 1e-6)
    assert row_tiles({**table_row("H200", batch), "dependent_launch": True}, batch, 4096, 132).dependent_launch


def table_row_of(rows: dict, batch: int) -> dict:
    return rows[min(largest for largest in rows if batch <= largest)]


def test_mismatched_shapes_are_refused():
    x, weights = random_ffn(1)
    with pytest.raises(ValueError, match="do not fit"):
        sparse_ffn(x[:, :10], weights["w_first"], weights["w_up"], weights["w_down_t"], SHIFTED_RELU, 0.1)
