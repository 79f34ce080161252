"""Sparse FFN decode kernels against the dense FFN (cuBLAS) and the bandwidth floor, on one GPU.

For each FFN shape, fraction of zeros and batch size, the same gated FFN runs dense (PyTorch:
three cuBLAS GEMVs and the activation, as a transformers MLP does) and through
`relufy.sparse.kernels.sparse_ffn`, each captured in a CUDA graph; the median of >= 50 replays
is reported. The floor is the bytes the sparse FFN must read (gate in full, plus the up rows and
down rows of the batch's union of active neurons) over the copy bandwidth measured in the same run.
Zeros come from a FATReLU threshold at the wanted quantile of the gate values, drawn
independently per token ("uniform"), so a batch's union is what random activity gives.

    python bench/sparse_ffn.py --output bench/out/sparse_ffn.json
    python bench/sparse_ffn.py --tiny --output /tmp/sparse_ffn.json   # CPU smoke run (Triton interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336), "llama2-13b": (5120, 13824)}
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
BATCHES = (1, 4, 16)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated from {', '.join(SHAPES)}")
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--crossover-batches", default="1,2,4,8,12,16,24,32",
                        help="batch sizes for the dense/sparse crossover at each sparsity ('' skips it)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--replays", type=int, default=100, help="timed CUDA-graph replays per case (>= 50)")
    parser.add_argument("--sweep-tiles", action="store_true",
                        help="instead: time tile variants of the kernels at 90%% zeros on the first shape, print the best")
    parser.add_argument("--tiny", action="store_true", help="one tiny shape on CPU under Triton's interpreter")
    parser.add_argument("--output", "-o", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from relufy.sparse.kernels import FATRELU, sparse_ffn
    from relufy.speed import copy_bandwidth

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)  # the interpreter mis-rounds bfloat16
    shapes = {"tiny": (64, 96)} if args.tiny else {name: SHAPES[name] for name in args.shapes.split(",")}
    sparsities = [float(s) for s in args.sparsities.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    bandwidth = copy_bandwidth(device, 1 << 30)  # eager: a copy inside a CUDA graph runs on the copy engine
    timer = Timer(device, 3 if args.tiny else args.replays)
    if args.sweep_tiles:
        ffn = RandomFFN(*next(iter(shapes.values())), dtype, device)
        report = {"sweep": sweep_tiles(ffn, batches, timer), "profile": profile_kernels(ffn, batches)}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    rows, crossover = [], []
    for name, (hidden, inter) in shapes.items():
        ffn = RandomFFN(hidden, inter, dtype, device)
        x = ffn.x_for(1)
        gate_ms = timer(lambda: torch.nn.functional.linear(x, ffn.w_gate))
        for sparsity in sparsities:
            for batch in batches:
                rows.append(ffn.case(name, sparsity, batch, timer, bandwidth, sparse_ffn, FATRELU, gate_ms))
                print_row(rows[-1])
            for batch in [int(b) for b in args.crossover_batches.split(",") if b] if not args.tiny else []:
                crossover.append(ffn.case(name, sparsity, batch, timer, bandwidth, sparse_ffn, FATRELU, gate_ms))
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
              "dtype": args.dtype, "copy_bandwidth_gb_s": bandwidth / 1e9, "replays": timer.replays,
              "torch": torch.__version__, "triton": __import__("triton").__version__,
              "rows": rows, "crossover": crossover}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s on {result['device']}; wrote {args.output}")
    return 0


class RandomFFN:
    """A gated FFN with random weights (W_down kept as W_down^T, row-major, as the kernels read it)."""

    def __init__(self, hidden: int, inter: int, dtype, device):
        import torch

        generator = torch.Generator(device=device).manual_seed(0)
        scale = hidden ** -0.5
        self.hidden, self.inter, self.dtype, self.device = hidden, inter, dtype, device
        self.w_gate = (torch.randn(inter, hidden, generator=generator, device=device) * scale).to(dtype)
        self.w_up = (torch.randn(inter, hidden, generator=generator, device=device) * scale).to(dtype)
        self.w_down_t = (torch.randn(inter, hidden, generator=generator, device=device) * inter ** -0.5).to(dtype)
        self.generator = generator
        from relufy.sparse.kernels import workspace_size

        self.workspace = torch.zeros(workspace_size(64, hidden), dtype=torch.int32, device=device)  # zero at rest

    def x_for(self, batch: int):
        import torch

        return torch.randn(batch, self.hidden, generator=self.generator, device=self.device).to(self.dtype)

    def dense(self, x, threshold: float):
        """The FFN as a transformers MLP computes it with FATReLU: three cuBLAS GEMVs."""
        import torch

        linear = torch.nn.functional.linear
        g = linear(x, self.w_gate)
        return linear(g.masked_fill(g < threshold, 0) * linear(x, self.w_up), self.w_down_t.t())

    def case(self, name, sparsity, batch, timer, bandwidth, sparse_ffn, fatrelu, gate_ms) -> dict:
        import torch

        x = self.x_for(batch)
        gate = torch.nn.functional.linear(x, self.w_gate).float()
        threshold = float(torch.quantile(gate.flatten().cpu(), sparsity))

        def dense():
            return self.dense(x, threshold)

        def sparse():
            return sparse_ffn(x, self.w_gate, self.w_up, self.w_down_t, fatrelu, threshold, workspace=self.workspace)

        reference, result = dense().float(), sparse().float()
        error = float((result - reference).norm() / reference.norm())
        active = (gate.to(self.dtype).float() >= threshold)
        union = int(active.any(0).sum())
        element = torch.finfo(self.dtype).bits // 8
        floor_bytes = element * (self.inter * self.hidden + 2 * union * self.hidden)
        dense_ms, sparse_ms = timer(dense), timer(sparse)
        return {"shape": name, "hidden": self.hidden, "intermediate": self.inter, "sparsity": sparsity,
                "batch": batch, "zero_ratio": 1 - float(active.float().mean()), "union_active": union / self.inter,
                "dense_us": dense_ms * 1e3, "sparse_us": sparse_ms * 1e3, "floor_us": floor_bytes / bandwidth * 1e6,
                "gate_gemv_us": gate_ms * 1e3, "sparse_over_dense": sparse_ms / dense_ms, "rel_error": error}


def sweep_tiles(ffn: "RandomFFN", batches: list[int], timer: "Timer") -> dict:
    """Time tile variants at 90% zeros: first-projection tiles, then down tiles on the best of those.

    Returns every variant's time, so the defaults in `choose_tiles` can be read off it.
    """
    import dataclasses
    import itertools

    import torch
    from triton.runtime.errors import OutOfResources

    from relufy.sparse.kernels import FATRELU, choose_tiles, sparse_ffn

    report = {}
    for batch in batches:
        x = ffn.x_for(batch)
        threshold = float(torch.quantile(torch.nn.functional.linear(x, ffn.w_gate).float().flatten().cpu(), 0.9))
        base = choose_tiles(batch, ffn.inter, ffn.hidden, x.device)
        timings = []

        def time_tiles(tiles):
            try:
                us = 1e3 * timer(lambda: sparse_ffn(x, ffn.w_gate, ffn.w_up, ffn.w_down_t, FATRELU, threshold,
                                                     workspace=ffn.workspace, tiles=tiles))
            except OutOfResources:
                us = float("inf")
            timings.append({**dataclasses.asdict(tiles), "us": us})
            return us

        first = []
        if batch <= 4:
            first += [dataclasses.replace(base, block_b=triton_pow2(batch), use_dot=False, block_n=n, block_k=k,
                                          warps_first=w, stages=st)
                      for n, k, w, st in itertools.product((4, 8, 16), (512, 1024), (4, 8), (1, 2))]
        if batch > 1:
            first += [dataclasses.replace(base, block_b=max(16, triton_pow2(batch)), use_dot=True, block_n=n, block_k=k,
                                          warps_first=w, stages=st, chunk=max(16, base.chunk))
                      for n, k, w, st in itertools.product((16, 32, 64), (64, 128), (4, 8), (3, 4))]
        best = min(first, key=time_tiles)
        down = [dataclasses.replace(best, split=sp, chunk=c, block_d=bd)
                for sp, c, bd in itertools.product((best.split, best.split * 2), (16, 32), (64, 128, 256))]
        best = min(down, key=time_tiles)
        report[batch] = {"default_us": time_tiles(base), "best_us": time_tiles(best),
                         "best": dataclasses.asdict(best), "variants": timings}
        print(f"batch {batch}: default {report[batch]['default_us']:.1f} us, best {report[batch]['best_us']:.1f} us "
              f"with {best}", flush=True)
    return report


def triton_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def profile_kernels(ffn: "RandomFFN", batches: list[int]) -> dict:
    """Device time of each kernel of one dense and one sparse FFN call at 90% zeros (torch.profiler)."""
    import torch

    from relufy.sparse.kernels import FATRELU, sparse_ffn

    report = {}
    for batch in batches:
        x = ffn.x_for(batch)
        threshold = float(torch.quantile(torch.nn.functional.linear(x, ffn.w_gate).float().flatten().cpu(), 0.9))
        calls = {"sparse": lambda: sparse_ffn(x, ffn.w_gate, ffn.w_up, ffn.w_down_t, FATRELU, threshold,
                                                 workspace=ffn.workspace),
                 "dense": lambda: ffn.dense(x, threshold)}
        for name, call in calls.items():
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
                for _ in range(20):
                    call()
                torch.cuda.synchronize()
            kernels = {event.key[:60]: event.self_device_time_total / 20 for event in profiler.key_averages()
                       if event.self_device_time_total > 0}
            report[f"{name} batch {batch}"] = kernels
            print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.1f} us" for k, v in kernels.items()), flush=True)
    return report


class Timer:
    """Median time (ms) of one call: CUDA-graph replays on CUDA, plain calls elsewhere, each timed
    with `relufy.speed.Timer` (CUDA events or the host clock)."""

    def __init__(self, device, replays: int):
        self.device, self.replays = device, replays

    def __call__(self, fn) -> float:
        from relufy.speed import Timer as Span
        from relufy.speed import capture

        run = capture(fn, warmup=3).replay if self.device.type == "cuda" else fn
        times = []
        for _ in range(self.replays):
            with Span(self.device) as span:
                run()
            times.append(span.seconds * 1e3)
        return statistics.median(times)


def print_row(row: dict) -> None:
    print(f"{row['shape']:>10} s={row['sparsity']:.2f} B={row['batch']:>2} union={row['union_active']:.2f}  "
          f"dense {row['dense_us']:7.1f} us  sparse {row['sparse_us']:7.1f} us  floor {row['floor_us']:6.1f} us  "
          f"ratio {row['sparse_over_dense']:.3f}  err {row['rel_error']:.1e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
