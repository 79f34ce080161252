"""When the down kernel reads every row: the active count above which the dense route is faster.

The sparse FFN walks a list of the active neurons; when most neurons are active, reading all rows
in order (no list, no gather) is faster. The decision is taken on the device, from the count the
first kernel leaves there, so a call stays CUDA-graph capturable. The threshold is measured, not
guessed: on CUDA, `dense_above` times one FFN's own weights with the route forced each way at a few
union sizes and keeps the largest count where the list still wins. Results are cached per GPU,
shape, dtype, batch and tiles in `~/.cache/relufy/dense_route.json` (`RELUFY_CACHE` moves it), so a
model's layers and later runs pay once. Weights off CUDA, or kernels under Triton's interpreter
(whose timings say nothing about a GPU), get the default fraction without timing anything.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from filelock import FileLock

from ..atomic import write_text_atomically

DEFAULT_DENSE_FRACTION = 0.5  # without CUDA: a union of more than half the neurons reads every row
UNIONS = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0)  # fractions of active neurons the calibration times
REPLAYS = 20


def cache_file() -> Path:
    return Path(os.environ.get("RELUFY_CACHE", Path.home() / ".cache" / "relufy")) / "dense_route.json"


def dense_above(w_first: torch.Tensor, w_up: torch.Tensor | None, w_down_t: torch.Tensor, tokens: int) -> int:
    """The active count above which calls of `tokens` tokens take the dense route (calibrated and
    cached for compiled kernels on CUDA; else the default fraction)."""
    n, d = w_down_t.shape
    if w_first.device.type != "cuda":
        return int(DEFAULT_DENSE_FRACTION * n)
    from .kernels import choose_tiles, interpreted

    if interpreted():
        return int(DEFAULT_DENSE_FRACTION * n)
    # the crossover depends on the tiles the calls run with: new tile rows calibrate again
    key = (f"{torch.cuda.get_device_name(w_first.device)}|{n}x{w_first.shape[1]}x{d}|{w_first.dtype}|"
           f"{'gated' if w_up is not None else 'plain'}|{tokens}|{choose_tiles(tokens, n, d, w_first.device)}")
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        cache = json.loads(path.read_text()) if path.exists() else {}
        if key not in cache:
            cache[key] = calibrate(w_first, w_up, w_down_t, tokens)["dense_above"]
            write_text_atomically(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return int(cache[key])


@torch.no_grad()
def calibrate(w_first: torch.Tensor, w_up: torch.Tensor | None, w_down_t: torch.Tensor, tokens: int,
              replays: int = REPLAYS) -> dict:
    """Time both routes at each union of UNIONS (CUDA-graph replays, median of `replays`; plain calls
    without CUDA).

    The union is set by a FATReLU threshold on the per-neuron largest gate value of random inputs.
    Returns `dense_above` (the largest timed count where the list won; N if it always won, one below
    the smallest timed count if it never did) and the timings, for the bench's JSON.
    """
    from .kernels import FATRELU, choose_tiles, sparse_ffn, workspace_size

    n, d = w_down_t.shape
    generator = torch.Generator(device=w_first.device).manual_seed(0)
    x = torch.randn(tokens, w_first.shape[1], generator=generator, device=w_first.device).to(w_first.dtype)
    peaks = torch.nn.functional.linear(x, w_first).float().amax(0).sort(descending=True).values.tolist()
    workspace = torch.zeros(workspace_size(tokens, n, d), dtype=torch.int32, device=x.device)
    tiles = choose_tiles(tokens, n, d, x.device)
    rows = []
    for fraction in UNIONS:
        count = max(1, round(fraction * n))
        threshold = peaks[count - 1]  # a host float: nothing may synchronise inside the capture
        times = {}
        for route, above in (("sparse", n), ("dense", -1)):
            times[route] = _median_us(lambda: sparse_ffn(x, w_first, w_up, w_down_t, FATRELU, threshold,
                                                         workspace=workspace, tiles=tiles, dense_above=above),
                                      replays, x.device.type == "cuda")
        rows.append({"count": count, "sparse_us": times["sparse"], "dense_us": times["dense"]})
    return {"dense_above": threshold_from(rows, n), "unions": rows}


def threshold_from(rows: list[dict], n: int) -> int:
    """The largest timed count below the first one where the dense route won (N if it never won;
    one below the smallest timed count if it won there already). `rows` are ordered by count."""
    first_dense = next((row["count"] for row in rows if row["dense_us"] < row["sparse_us"]), None)
    if first_dense is None:
        return n
    return max((row["count"] for row in rows if row["count"] < first_dense), default=first_dense - 1)


def _median_us(fn, replays: int, cuda: bool) -> float:
    """Median microseconds of `fn` replayed from a CUDA graph (warmed up on a side stream first), or of
    plain calls without CUDA."""
    if not cuda:
        return _median_host_us(fn, replays)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end))
    return statistics.median(times)


def _median_host_us(fn, replays: int) -> float:
    times = []
    for _ in range(replays):
        start = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - start))
    return statistics.median(times)
