"""Sparse FFN decode kernels against the dense FFN (cuBLAS) and the bandwidth floor, on one GPU.

One run measures, on the Llama-2-7B, Llama-3-8B and Llama-2-13B FFN shapes by default (bf16, random
weights; `--shapes` adds Llama-3.2-1B's and SmolLM2-135M's):

1. the copy bandwidth of the GPU (device-to-device copy, read + write);
2. at 90% zeros and 1, 4, 8 and 16 tokens: the dense FFN (PyTorch: three cuBLAS GEMVs and the
   activation, as a transformers MLP) and the sparse FFN (`relufy.sparse.kernels.sparse_ffn`);
3. at 50% zeros and 1, 4, 8 and 16 tokens: the same.
   Every sparse call routes as `sparsify` does: the dense route above the threshold
   `relufy.sparse.routing.calibrate` measures for the shape (its timings are in the JSON);
4. for every case, the largest relative error max |sparse - dense| / max |dense| (bf16: <= 1e-2)
   and which route the down kernel took;
5. per shape, each kernel of one dense call and of one sparse call at 90% zeros (torch.profiler):
   its device time and the bandwidth it reaches against the copy bandwidth.

The JSON is rewritten (atomically) after every case, calibration, profile and sweep entry, so a run
cut short by a time limit keeps everything that finished.

Every time is a CUDA-graph replay of one FFN call on each of `--layers` copies of the weights in
turn (so the active rows of one call are not in L2 for the next), divided by the layers; median of
`--replays`. Zeros come from a FATReLU threshold at the wanted quantile of each layer's gate values,
drawn independently per token, so a batch's union is what random activity gives. The floor is the
bytes the sparse FFN must read (gate in full, up and down rows of the union) at the copy bandwidth.

    python bench/sparse_ffn.py --output bench/out/sparse_ffn.json        # everything, one GPU
    python bench/sparse_ffn.py --table bench/out/sparse_ffn.json         # its markdown tables again
    python bench/sparse_ffn.py --sweep-tiles --shapes llama2-7b --batches 1,4,8,16 --output sweep.json
    python bench/sparse_ffn.py --table sweep.json                        # the sweep's tile table rows again
    python bench/sparse_ffn.py --tiny --output /tmp/sparse_ffn.json      # CPU smoke run (Triton interpreter)
    python bench/sparse_ffn.py --shapes smollm2-135m --layers 32 --output bench/out/sparse_ffn-135m.json

The sweep times tile table rows: the first kernel's candidates (up to 4 tokens, the persistent first
kernel's too), then the down kernel's on the best of those, then "up in down" ones, each checked
against the dense FFN as the rows are (one off by more than 1e-2 is printed and left out); it ends by
printing the rows of its GPU family, one batch class per swept batch size, ready to paste into
src/relufy/sparse/kernels/tiles.py (TILE_TABLE, or NARROW_TILE_TABLE for a shape up to NARROW_WIDTH
wide). It compiles its candidates in `--compile-workers` processes first (Triton's on-disk cache
then serves the timing process), since compiling, not timing, is most of its time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336), "llama2-13b": (5120, 13824),
          "llama3.2-1b": (2048, 8192), "smollm2-135m": (576, 1536)}
MAX_REL_ERROR = 1e-2  # bf16 against the dense FFN


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="llama2-7b,llama3-8b,llama2-13b",
                        help=f"comma-separated from {', '.join(SHAPES)} (small shapes fit in L2: raise --layers)")
    parser.add_argument("--batches", default="1,4,8,16", help="batch sizes at 90%% zeros (and of the sweep)")
    parser.add_argument("--routing-batches", default="1,4,8,16", help="batch sizes at 50%% zeros")
    parser.add_argument("--layers", type=int, help="weight copies the timed calls rotate over (default 4; --tiny: 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--replays", type=int, help="timed CUDA-graph replays per case (default 100; --tiny: 3)")
    parser.add_argument("--sweep-tiles", action="store_true",
                        help="instead: time tile candidates at 90%% zeros on the first shape and profile each kernel")
    parser.add_argument("--compile-workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes that compile the sweep's candidates ahead of timing (0: compile inline)")
    parser.add_argument("--tiny", action="store_true", help="one tiny shape on CPU under Triton's interpreter")
    parser.add_argument("--table", type=Path,
                        help="only print the markdown tables (or a sweep's tile table rows) of a JSON this script wrote")
    parser.add_argument("--output", "-o", type=Path)
    args = parser.parse_args(argv)
    if args.table is None and args.output is None:
        parser.error("--output is required (or --table JSON)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        result = json.loads(args.table.read_text())
        print(tile_table_text(result) if "sweep" in result else markdown(result))
        return 0
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from relufy.timing import copy_bandwidth, median_seconds, record_gpu_processes

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)  # the interpreter mis-rounds bfloat16
    shapes = {"tiny": (64, 96)} if args.tiny else {name: SHAPES[name] for name in args.shapes.split(",")}
    # --tiny takes fewer unless told: a smoke test that checks no timing passes 1 of each, since every
    # interpreted FFN call takes most of a second of CPU
    layers = args.layers or (2 if args.tiny else 4)
    bandwidth = copy_bandwidth(device, 1 << 30)  # eager: a copy inside a CUDA graph runs on the copy engine
    replays = args.replays or (3 if args.tiny else 100)
    # median seconds of one call: CUDA-graph replays on CUDA, plain calls elsewhere
    timer = functools.partial(median_seconds, device=device, repeats=replays)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
              "dtype": str(dtype).removeprefix("torch."), "copy_bandwidth_gb_s": bandwidth / 1e9,
              "replays": replays, "layers": layers, "torch": torch.__version__,
              "triton": __import__("triton").__version__, "complete": False}
    record_gpu_processes(result, device)
    save = functools.partial(write_json, args.output, result)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s on {result['device']}; writing {args.output} as it goes",
          flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    if args.sweep_tiles:
        ffn = RandomFFN(*next(iter(shapes.values())), layers, dtype, device)
        result["profile"] = profile_kernels(ffn, batches, bandwidth, save)
        compiler = Precompiler(args.compile_workers, ffn) if args.compile_workers > 0 else None
        result["tile_family"] = tile_family(result["device"])
        result["sweep_width"] = ffn.hidden  # which table its rows are for (NARROW_TILE_TABLE up to NARROW_WIDTH)
        result["sweep"] = sweep_tiles(ffn, batches, timer, save, compiler, limit=2 if args.tiny else None)
    else:
        measure_shapes(shapes, args, layers, dtype, device, timer, bandwidth, result, save)
    record_gpu_processes(result, device)
    result["complete"] = True
    save()
    print(tile_table_text(result) if args.sweep_tiles else markdown(result))
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s on {result['device']}; wrote {args.output}")
    return 0


def write_json(path: Path, result: dict) -> None:
    """The results so far, written whole or not at all: a run cut short keeps what finished."""
    from relufy.atomic import write_json_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, result)


def measure_shapes(shapes, args, layers, dtype, device, timer, bandwidth, result, save) -> None:
    """Rows at 90% and at 50% zeros, the dense route above the shape's calibrated
    threshold; then each kernel's bandwidth at 90% zeros. `result` grows and is saved after each step."""
    from relufy.sparse.routing import calibrate

    result.update(rows=[], calibration={}, profile={})
    for name, (hidden, inter) in shapes.items():
        ffn = RandomFFN(hidden, inter, layers, dtype, device)
        route = calibrate(ffn.w_gate[0], ffn.w_up[0], ffn.w_down_t[0], 8) if device.type == "cuda" else None
        dense_above = route["dense_above"] if route else inter // 2
        result["calibration"][name] = route
        save()
        for sparsity, batches in ((0.9, args.batches), (0.5, args.routing_batches)):
            for batch in [int(b) for b in batches.split(",") if b]:
                result["rows"].append(ffn.case(name, sparsity, batch, dense_above, timer, bandwidth))
                print_row(result["rows"][-1])
                save()
        result["profile"][name] = {}
        profile_kernels(ffn, [int(b) for b in args.batches.split(",")], bandwidth, save, result["profile"][name])
        del ffn


class RandomFFN:
    """`layers` gated FFNs with random weights of one shape (W_down kept as W_down^T, row-major,
    as the kernels read it); timed calls run on each in turn."""

    def __init__(self, hidden: int, inter: int, layers: int, dtype, device):
        import torch

        from relufy.sparse.kernels import workspace_size

        generator = torch.Generator(device=device).manual_seed(0)

        def weights(rows, cols, scale):
            return [(torch.randn(rows, cols, generator=generator, device=device) * scale).to(dtype)
                    for _ in range(layers)]

        self.hidden, self.inter, self.dtype, self.device, self.generator = hidden, inter, dtype, device, generator
        self.w_gate, self.w_up = weights(inter, hidden, hidden ** -0.5), weights(inter, hidden, hidden ** -0.5)
        self.w_down_t = weights(inter, hidden, inter ** -0.5)
        self.workspace = torch.zeros(workspace_size(64, inter, hidden), dtype=torch.int32, device=device)

    def x_for(self, batch: int):
        import torch

        return torch.randn(batch, self.hidden, generator=self.generator, device=self.device).to(self.dtype)

    def dense(self, layer: int, x, threshold: float):
        """The FFN as a transformers MLP computes it with FATReLU: three cuBLAS GEMVs."""
        linear = __import__("torch").nn.functional.linear
        g = linear(x, self.w_gate[layer])
        return linear(g.masked_fill(g < threshold, 0) * linear(x, self.w_up[layer]), self.w_down_t[layer].t())

    def sparse(self, layer: int, x, threshold: float, tiles, dense_above=None, routes=None):
        from relufy.sparse.kernels import FATRELU, sparse_ffn

        return sparse_ffn(x, self.w_gate[layer], self.w_up[layer], self.w_down_t[layer], FATRELU, threshold,
                          workspace=self.workspace, tiles=tiles, dense_above=dense_above, routes=routes)

    def thresholds(self, x, sparsity: float) -> list[float]:
        import torch

        return [float(torch.quantile(torch.nn.functional.linear(x, w).float().flatten().cpu(), sparsity))
                for w in self.w_gate]

    def case(self, name, sparsity, batch, dense_above, timer, bandwidth) -> dict:
        """Dense and sparse on the same inputs: times, error, route, union, floor."""
        import torch

        from relufy.sparse.kernels import choose_tiles

        x = self.x_for(batch)
        thresholds = self.thresholds(x, sparsity)
        layers = range(len(self.w_gate))
        unions = [int((torch.nn.functional.linear(x, w).float() >= t).any(0).sum()) for w, t in zip(self.w_gate,
                                                                                                    thresholds)]
        union = statistics.mean(unions)
        element = torch.finfo(self.dtype).bits // 8
        floor_bytes = element * (self.inter * self.hidden + 2 * union * self.hidden)
        row = {"shape": name, "hidden": self.hidden, "intermediate": self.inter, "sparsity": sparsity, "batch": batch,
               "union_active": union / self.inter, "dense_above": dense_above, "floor_us": floor_bytes / bandwidth * 1e6,
               "dense_us": timer(lambda: [self.dense(i, x, thresholds[i]) for i in layers]) * 1e6 / len(layers)}
        tiles = choose_tiles(batch, self.inter, self.hidden, x.device)
        routes = torch.zeros(2, dtype=torch.int32, device=x.device)
        error = self.max_error(x, thresholds, tiles, dense_above, routes)
        us = timer(lambda: [self.sparse(i, x, thresholds[i], tiles, dense_above) for i in layers]) * 1e6 / len(layers)
        row.update(sparse_us=us, sparse_over_dense=us / row["dense_us"], max_rel_error=error,
                   dense_route_calls=int(routes[1]), calls=len(layers))
        return row

    def max_error(self, x, thresholds, tiles, dense_above=None, routes=None) -> float:
        """The largest `max_rel_error` of the sparse FFN with `tiles` against the dense one over the layers."""
        return max(max_rel_error(self.sparse(i, x, threshold, tiles, dense_above, routes).float(),
                                 self.dense(i, x, threshold).float()) for i, threshold in enumerate(thresholds))


def max_rel_error(result, reference) -> float:
    return float((result - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def sweep_tiles(ffn: RandomFFN, batches: list[int], timer, save, compiler=None, limit: int | None = None) -> dict:
    """Time TILE_TABLE rows at 90% zeros: the first kernel's candidates (one program per row block, and
    persistent), then the down kernel's on the best of those, then "up in down" candidates against the
    best so far, then the best with its second kernel launched as the first's programmatic dependent
    (the first `limit` candidates of each, for a smoke run). Every candidate's time and
    error against the dense FFN are kept; one off by more than MAX_REL_ERROR is never the best. The
    JSON is saved after each batch size. `compiler` (a Precompiler) compiles each stage's candidates in
    parallel first."""
    from relufy.sparse.kernels import choose_tiles, device_row, family_and_multiprocessors, row_tiles

    _, multiprocessors = family_and_multiprocessors(ffn.device)
    report = {}
    for batch in batches:
        x = ffn.x_for(batch)
        thresholds = ffn.thresholds(x, 0.9)
        layers = range(len(ffn.w_gate))
        timings = []

        def tiles_of(row):
            return row_tiles(row, batch, ffn.hidden, multiprocessors)

        def time_tiles(tiles, row=None):
            """The candidate's time in us, as `fastest` ranks it: infinite where it does not run, or where
            its output is further than MAX_REL_ERROR from the dense FFN's (a fast but wrong candidate must
            not become a row to paste). Its time and error go into the JSON."""
            try:
                error = ffn.max_error(x, thresholds, tiles)
                us = 1e6 * timer(lambda: [ffn.sparse(i, x, thresholds[i], tiles) for i in layers]) / len(layers)
            except Exception:  # noqa: BLE001  (out of resources on this GPU)
                error, us = None, float("inf")
            timings.append({**(row or {}), **dataclasses.asdict(tiles), "us": us, "max_rel_error": error})
            if error is not None and not error <= MAX_REL_ERROR:  # NaN fails too
                print(f"batch {batch}: {row or tiles} is off the dense FFN by {error:.1e} (bound {MAX_REL_ERROR:g}): "
                      "left out", flush=True)
                return float("inf")
            return us

        def fastest(rows):
            launches = {}  # rows that give the same launch (the split's cap) are timed once
            for row in rows:
                launches.setdefault(tiles_of(row), row)
            rows = list(launches.values())
            if compiler:
                compiler.compile(batch, [tiles_of(row) for row in rows])
            return min(rows, key=lambda row: time_tiles(tiles_of(row), row))

        # the row this device takes for the shape, as a two-kernel row: "up in down" candidates come last,
        # against the best of both kernels
        base = {**device_row(batch, ffn.hidden, ffn.device), "up_in_down": False}
        best = fastest(first_rows(base, batch)[:limit] + persistent_first_rows(base, batch)[:limit]
                       + relaxed_append_rows(base, batch))
        best = fastest(down_rows(best, batch)[:limit])
        best = fastest([best] + up_in_down_rows(best, batch)[:limit])
        best = fastest(dependent_launch_rows(best))
        report[batch] = {"default_us": time_tiles(choose_tiles(batch, ffn.inter, ffn.hidden, x.device)),
                         "best_us": time_tiles(tiles_of(best), best), "best": best,
                         "best_tiles": dataclasses.asdict(tiles_of(best)), "candidates": timings}
        print(f"batch {batch}: default {report[batch]['default_us']:.1f} us, best {report[batch]['best_us']:.1f} us "
              f"with {best} ({len(timings)} timed)", flush=True)
        save()
    if compiler:
        compiler.close()
    return report


class Precompiler:
    """Compiles tile candidates in worker processes before the timing process runs them.

    Each worker holds one layer of the same shape and runs each candidate once. That fills Triton's
    on-disk cache with exactly the kernels the timed calls then load (same constants, and the same
    argument values, so the same specialisation); compiling, not timing, is most of a sweep's time.
    """

    def __init__(self, workers: int, ffn: RandomFFN):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # the workers use CUDA
        dtype = str(ffn.dtype).removeprefix("torch.")
        self.pool = context.Pool(workers, initializer=_compile_worker_init,
                                 initargs=(ffn.hidden, ffn.inter, dtype, str(ffn.device)))

    def compile(self, batch: int, candidates: list) -> None:
        self.pool.map(_compile_candidate, [(batch, tiles) for tiles in candidates], chunksize=1)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


_WORKER: dict = {}


def _compile_worker_init(hidden: int, inter: int, dtype: str, device: str) -> None:
    import torch

    _WORKER["ffn"] = RandomFFN(hidden, inter, 1, getattr(torch, dtype), torch.device(device))


def _compile_candidate(job) -> None:
    """Run one candidate once (compiling it); a failure is left for the timing process to record."""
    batch, tiles = job
    ffn = _WORKER["ffn"]
    try:
        ffn.sparse(0, ffn.x_for(batch), 0.0, tiles)
        if ffn.device.type == "cuda":
            __import__("torch").cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass


def first_rows(base: dict, batch: int) -> list[dict]:
    """The first kernel's candidates around TILE_TABLE row `base`: rows per program, K step, warps,
    stages; broadcast tiles up to 4 tokens, tensor cores above 1. At one token, K steps up to 4096
    too, one stage only: the broadcast loop is not software-pipelined, so a program's bytes in flight
    are one step's rows, and a faster memory (the H200's) may want more of them, or more programs of
    fewer rows and warps (2-row blocks, 2 warps). Left out: broadcast tiles of more than 128 fp32
    partial sums per thread (registers)."""
    candidates = []
    if batch <= 4:
        one = batch == 1
        steps, stages = ((256, 512, 1024, 2048, 4096), (1,)) if one else ((256, 512, 1024), (1, 3))
        rows, warps = ((2, 4, 8, 16, 32), (2, 4, 8, 16)) if one else ((4, 8, 16, 32), (4, 8, 16))
        candidates += [{**base, "use_dot": False, "block_n": n, "block_k": k, "warps_first": w, "stages": st}
                       for n, k, w, st in itertools.product(rows, steps, warps, stages)
                       if pow2(batch) * n * k <= 128 * 32 * w]
    if batch > 1:
        candidates += [{**base, "use_dot": True, "block_n": n, "block_k": k, "warps_first": w, "stages": st}
                       for n, k, w, st in itertools.product((16, 32, 64), (64, 128), (4, 8), (3, 4))]
    return candidates


def persistent_first_rows(base: dict, batch: int) -> list[dict]:
    """Candidates of the persistent first kernel (`first_per_sm` programs per multiprocessor, each
    walking row blocks in a loop Triton pipelines over `stages`; 1 stage: no pipelining), up to 4
    tokens. At one token, broadcast tiles: today's (4 rows, 1024-wide K steps, 4 warps) at 1, 2, 4 and
    5 programs per multiprocessor and 1 to 4 stages; half its bytes per step (4 x 512, 4 warps) at 2,
    4 and 7 programs and twice them (4 x 2048, 8 warps) at 1 and 2, both at 2 to 4 stages. The most
    programs per multiprocessor are about as many as fit at 3 stages (5, 7 and 2: registers and shared
    memory of the sm_90 code of Triton 3.6 and 3.9), each with 2 steps of gate rows in flight. At 2 to
    4 tokens, `base`'s tiles at 1 and 2 programs per multiprocessor and 2 to 4 stages (tensor-core
    tiles at 3 stages leave room for 2)."""
    if batch > 4:
        return []
    if batch > 1:
        return [{**base, "first_per_sm": p, "stages": st} for p, st in itertools.product((1, 2), (2, 3, 4))]
    shapes = [((4, 1024, 4), (1, 2, 4, 5), (1, 2, 3, 4)), ((4, 512, 4), (2, 4, 7), (2, 3, 4)),
              ((4, 2048, 8), (1, 2), (2, 3, 4))]
    return [{**base, "use_dot": False, "block_n": n, "block_k": k, "warps_first": w, "first_per_sm": p, "stages": st}
            for (n, k, w), programs, stages in shapes for p, st in itertools.product(programs, stages)]


def relaxed_append_rows(base: dict, batch: int) -> list[dict]:
    """The control for the persistent candidates, whose list append is relaxed: `base` (the device's
    row) with one program per row block and a relaxed append, up to 4 tokens. Against `base` itself it
    measures what the append's memory order alone costs."""
    return [{**base, "relaxed_append": True}] if batch <= 4 and not base.get("first_per_sm") else []


def dependent_launch_rows(best: dict) -> list[dict]:
    """The best row so far with its second kernel launched plainly, then as the first's programmatic
    dependent (`Tiles.dependent_launch`): the same kernels and tiles, timed as a graph of calls runs them,
    where the launch gap between the two kernels is what it can save. Both, whatever the device's row says,
    so a sweep can also take the flag back; a tie keeps the plain launch (on a GPU before Hopper both
    launch plainly)."""
    return [{**best, "dependent_launch": flag} for flag in (False, True)]


def down_rows(best: dict, batch: int) -> list[dict]:
    """The down kernel's candidates on the first kernel's best row: columns per program (row segments
    of 256 B to 1 KB in bf16), rows per step, programs per multiprocessor, warps, and at several
    tokens with and without software pipelining (Triton pipelines only the tensor-core path); first,
    `best` itself (the table's current down tiles). Programs per multiprocessor go down to a quarter:
    a narrow FFN (SmolLM2's 576 columns are 5 column blocks) reaches the 64-program cap per column
    block from 1 per multiprocessor on, so only fewer can tell whether fewer programs, each walking
    more of the list, are faster there. Left out: tiles of more than 128 elements per thread
    (registers) or 64 Ki elements per multiprocessor (more programs than fit at once)."""
    if batch == 1:
        grid = itertools.product((128, 256, 512), (32, 64, 128), (0.25, 0.5, 1, 2, 4, 8), (4, 8),
                                 (best["stages_down"],))
    else:
        grid = itertools.product((128, 256), (32, 64), (0.25, 0.5, 1, 2, 4, 8, 16), (4, 8),
                                 sorted({1, best["stages_down"]}))
    tokens = 1 if best["use_dot"] else pow2(batch)  # broadcast tiles keep a partial sum per token
    return [best] + [{**best, "block_d": d, "chunk": c, "down_per_sm": p, "warps_down": w, "stages_down": st}
                     for d, c, p, w, st in grid if tokens * c * d <= 128 * 32 * w and p * tokens * c * d <= 1 << 16]


def up_in_down_rows(best: dict, batch: int) -> list[dict]:
    """"Up in down" candidates (`Tiles.up_in_down`, at up to 8 tokens) on the best row so far: list
    rows per step (`chunk`), list slices per multiprocessor (`down_per_sm`, fractions too), warps and
    columns per step of the second kernel; at one token also the K step, which both kernels take
    (the gate-only first kernel and the second kernel's W_up rows). Tensor-core tiles need 16 rows
    per step. Left out: broadcast tiles of more than 128 fp32 partial sums per thread (registers)."""
    if batch > 8:
        return []
    tokens = 1 if best["use_dot"] else pow2(batch)
    chunks = (16, 32) if best["use_dot"] else (8, 16)
    steps = (512, 1024) if batch == 1 else (best["block_k"],)
    columns = (1024, 4096) if batch == 1 else (256, 1024, 4096)
    grid = itertools.product(chunks, (0.5, 1, 2), (4, 8), columns, steps)
    rows = [{**best, "up_in_down": True, "chunk": c, "down_per_sm": p, "warps_down": w, "block_d": d, "block_k": k}
            for c, p, w, d, k in grid if tokens * c * d <= 128 * 32 * w]
    return [row for row in rows if row["use_dot"] or (
        tokens * row["chunk"] * row["block_k"] <= 128 * 32 * row["warps_down"]
        and tokens * row["block_n"] * row["block_k"] <= 128 * 32 * row["warps_first"])]


def tile_table_text(result: dict) -> str:
    """The TILE_TABLE statement of a sweep's best rows, ready to paste over its GPU family's in
    src/relufy/sparse/kernels/tiles.py: one batch class per swept batch size, the largest serving
    every larger batch; NARROW_TILE_TABLE's for a swept width up to NARROW_WIDTH (a sweep that did
    not record its width was of the Llama-2-7B shape)."""
    from relufy.sparse.kernels import NARROW_WIDTH

    best = {int(batch): {"up_in_down": False, **entry["best"]} for batch, entry in result["sweep"].items()}
    first_keys = ("block_n", "block_k", "use_dot", "warps_first", "stages", "first_per_sm", "relaxed_append")
    table = "NARROW_TILE_TABLE" if result.get("sweep_width", 1 << 30) <= NARROW_WIDTH else "TILE_TABLE"
    lines = [f"{table}[{json.dumps(result['tile_family'])}] = {{"]
    for batch, row in sorted(best.items()):
        key = "1 << 30" if batch == max(best) else str(batch)
        first = ", ".join(f"{name}={row[name]!r}" for name in first_keys if name in row)
        down = ", ".join(f"{name}={value!r}" for name, value in row.items() if name not in first_keys)
        lines += [f"    {key}: dict({first},", f"    {' ' * len(key)}       {down}),"]
    return "\n".join(lines + ["}"])


def tile_family(device_name: str) -> str:
    """The TILE_TABLE key for a GPU: the family its name contains, else the name itself (a new family)."""
    from relufy.sparse.kernels import TILE_TABLE

    return next((family for family in TILE_TABLE if family in device_name), device_name)


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def profile_kernels(ffn: RandomFFN, batches: list[int], bandwidth: float, save, report: dict | None = None) -> dict:
    """Device time of each kernel of one dense and one sparse call at 90% zeros (torch.profiler), and
    the bandwidth each kernel reaches, against the copy bandwidth of this run. Entries go into
    `report` (saved after each)."""
    import torch

    from relufy.sparse.kernels import choose_tiles

    report = {} if report is None else report
    if not torch.cuda.is_available() or ffn.device.type != "cuda":
        return report
    for batch in batches:
        x = ffn.x_for(batch)
        threshold = ffn.thresholds(x, 0.9)[0]
        union = int((torch.nn.functional.linear(x, ffn.w_gate[0]).float() >= threshold).any(0).sum())
        tiles = choose_tiles(batch, ffn.inter, ffn.hidden, x.device)
        calls = {"dense": lambda: ffn.dense(0, x, threshold),
                 "sparse": functools.partial(ffn.sparse, 0, x, threshold, tiles)}
        for name, call in calls.items():
            kernels = profile(call)
            for kernel in kernels:
                read = kernel_bytes(kernel["name"], ffn, union, tiles.up_in_down)
                kernel["gb_per_s"] = read / kernel["us_per_call"] / 1e3
                kernel["of_copy_bandwidth"] = kernel["gb_per_s"] * 1e9 / bandwidth
            report[f"{name} batch {batch}"] = kernels
            print(f"{ffn.inter}x{ffn.hidden} {name} batch {batch}: " + "; ".join(
                f"{k['name'][:40]} {k['us_per_call']:.1f} us x{k['calls_per_ffn']:g}"
                + (f" {k['gb_per_s']:.0f} GB/s = {k['of_copy_bandwidth']:.0%} of copy" if k["gb_per_s"] else "")
                for k in kernels), flush=True)
            save()
    return report


def profile(call, iterations: int = 20) -> list[dict]:
    """Each kernel's name, device time per call and calls per FFN call."""
    import torch

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(iterations):
            call()
        torch.cuda.synchronize()
    return [{"name": event.key, "calls_per_ffn": event.count / iterations,
             "us_per_call": event.self_device_time_total / event.count}
            for event in profiler.key_averages() if event.self_device_time_total > 0]


def kernel_bytes(kernel: str, ffn: RandomFFN, union: int, up_in_down: bool = False) -> float:
    """Bytes one launch of `kernel` must read (0 for small elementwise kernels): a cuBLAS GEMV reads
    its whole matrix, the first kernel the gate and the union's up rows (only the gate "up in down"),
    the down kernel the union's down rows, "up in down"'s second kernel its up and down rows."""
    import torch

    element = torch.finfo(ffn.dtype).bits // 8
    matrix = ffn.inter * ffn.hidden * element
    row = ffn.hidden * element
    if "first_projection_kernel" in kernel:
        return matrix + (0 if up_in_down else union * row)
    if "up_down_kernel" in kernel:
        return 2 * union * row
    if "down_kernel" in kernel:
        return union * row
    if any(tag in kernel.lower() for tag in ("gemv", "gemm", "nvjet", "cutlass", "sm90_xmma")):
        return matrix
    return 0


def print_row(row: dict) -> None:
    print(f"{row['shape']:>10} zeros={row['sparsity']:.2f} B={row['batch']:>2} union={row['union_active']:.2f}  "
          f"dense {row['dense_us']:7.1f} us  floor {row['floor_us']:6.1f} us  sparse {row['sparse_us']:7.1f} us = "
          f"{row['sparse_over_dense']:.3f}x (err {row['max_rel_error']:.1e}, dense route "
          f"{row['dense_route_calls']}/{row['calls']})", flush=True)


def markdown(result: dict) -> str:
    """The table docs/inference.md shows: sparse / dense per case, errors, routes."""
    lines = [f"{result['device']}, {result['dtype']}, copy bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s; "
             f"median of {result['replays']} timed CUDA-graph replays, {result['layers']} weight copies in turn. "
             "`*`: the dense route was taken.", "",
             "| shape | zeros | batch | union | dense us | sparse us | floor us | sparse / dense | max rel. error |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        lines.append(f"| {row['shape']} | {row['sparsity']:.0%} | {row['batch']} | {row['union_active']:.0%} | "
                     f"{row['dense_us']:.1f} | {row['sparse_us']:.1f} | {row['floor_us']:.1f} | "
                     f"{row['sparse_over_dense']:.2f}{'*' if row['dense_route_calls'] else ''} | "
                     f"{row['max_rel_error']:.1e} |")
    worst = max((row["max_rel_error"] for row in result["rows"]), default=0.0)
    routed = [row["sparse_over_dense"] for row in result["rows"] if row["sparsity"] == 0.5]
    single = [row["sparse_over_dense"] for row in result["rows"] if row["sparsity"] == 0.9 and row["batch"] == 1]
    routes = [f"{name} {route['dense_above']}" for name, route in result.get("calibration", {}).items() if route]
    lines += ["", f"Largest max |sparse - dense| / max |dense| of any case: {worst:.1e} "
              f"({'within' if worst <= MAX_REL_ERROR else 'ABOVE'} {MAX_REL_ERROR:g}).",
              f"90% zeros, batch 1: {_span(single)} of dense time (goal <= 0.45); 50% zeros: at most "
              f"{max(routed, default=float('nan')):.2f} (goal <= 1.02, i.e. >= 0.98x dense speed)."]
    if routes:
        lines.append("Dense route above this many active neurons (calibrated at 8 tokens): " + ", ".join(routes) + ".")
    return "\n".join(lines)


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"


if __name__ == "__main__":
    sys.exit(main())
