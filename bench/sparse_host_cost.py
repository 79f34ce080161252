"""Host cost of the sparse FFN in eager PyTorch: dense against sparsified FFN calls made one after another, as
HF `model.generate` makes them (batch 1, no CUDA graph, no torch.compile), in one process on one GPU.

Eager `generate` is bound by the host: the GPU finishes each kernel before Python has issued the next, so what
a token costs is the Python, dispatch and launch work per call, not the bytes the kernels read. This script
times that work for one FFN call, dense (three cuBLAS GEMVs, the activation and the product, as the
transformers MLP runs them) and sparse (`relufy.sparse.sparsify`'s forward: the `relufy::sparse_ffn`
operator, its tile choice and two Triton launches), on random Llama FFNs of each `--shapes` shape with a
FATReLU threshold at the `--sparsity` quantile of the gate values (90% zeros by default).

That cost is why `sparsify` runs eager CUDA calls dense unless `SparseConfig.eager`: the sparse arm opts in
(`sparse_eager`). On CUDA a third arm, `eager_dense`, is the sparsified FFN's default eager call, its dense
forward after the check (`relufy.sparse.takes_kernels`); "eager check" is what that adds to a dense call. Its
device time is not measured: a CUDA-graph capture runs the kernels.

Per arm and round, `--calls` calls cycle over `--layers` FFNs (so one call's rows are not in L2 for the next)
with a synchronisation only before and after the loop, so host and GPU overlap as in `generate`:

- host: the host clock from the first call until the last one returned, i.e. the time to issue the calls;
- wall: the same clock until the GPU has finished them too (the host time plus whatever the GPU still had
  queued; equal to it give or take the last kernels when the loop is host-bound);
- device: one call's GPU time alone, from CUDA-graph replays of one pass over the layers (no host work).

Each is per call, the median over `--rounds` rounds (dense and sparse alternate, the order swapped every
round), with the ratio sparse / dense; "extra host" is what a sparse call adds to a dense one on the host,
which eager decode pays once per layer and token.

    python bench/sparse_host_cost.py --json bench/out/sparse_host_cost.json
    python bench/sparse_host_cost.py --shapes llama2-7b --calls 4000 --rounds 9
    python bench/sparse_host_cost.py --tiny --json /tmp/sparse_host_cost.json   # CPU smoke run (Triton interpreter)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from pathlib import Path

SHAPES = {"smollm2-135m": (576, 1536), "llama2-7b": (4096, 11008), "tiny": (64, 256)}
TIMES = ("host_us", "wall_us", "device_us")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="smollm2-135m,llama2-7b", help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--layers", type=int, default=8, help="FFNs the calls cycle over")
    parser.add_argument("--calls", type=int, default=2000, help="calls per arm and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replays", type=int, default=20, help="CUDA-graph replays for the device time")
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of zeros the threshold is set for")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run under Triton's interpreter: the tiny shape, 2 layers, a few calls")
    parser.add_argument("--json", type=Path, help="write the measurement here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shapes, args.layers, args.calls, args.rounds, args.replays = "tiny", 2, 4, 1, 1
    return args


def sparse_llama(hidden: int, inter: int, layers: int, sparsity: float, dtype, device):
    """A random Llama of this FFN shape (tiny attention and vocabulary), its FFNs set to FATReLU with the
    threshold at the `sparsity` quantile of their gate values on random inputs, then sparsified; with those
    inputs (one token per layer) and the threshold."""
    import torch
    from decode_speed import random_llama, use_fatrelu  # this script's sibling, on sys.path when run

    from relufy.architectures import ffn_modules
    from relufy.sparse import sparse_ffn_count, sparsify

    model = random_llama(dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=4, vocab_size=256), dtype, device)
    ffns = ffn_modules(model)
    inputs = [torch.randn(1, 1, hidden, dtype=dtype, device=device) for _ in ffns]
    with torch.no_grad():
        sample = torch.randn(64, hidden, dtype=dtype, device=device)
        gates = torch.cat([ffn.gate_proj(sample).flatten().float() for ffn in ffns])
    threshold = use_fatrelu(model, gates, sparsity)
    sparsify(model)
    if sparse_ffn_count(model) != layers:
        raise SystemExit("sparsify left the FFNs dense (see its warning): this needs CUDA, or --tiny")
    return model, ffns, inputs, threshold


def time_calls(ffns, inputs, calls: int, device) -> tuple[float, float]:
    """Seconds per call to issue `calls` FFN calls (host) and until the device finished them (wall), one
    synchronisation before the loop and one after it."""
    import torch

    from relufy.timing import Timer

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    layers = len(ffns)
    synchronize()
    timer = Timer().start()  # the host clock: CUDA events would time the GPU, not the issuing
    for i in range(calls):
        ffns[i % layers](inputs[i % layers])
    host = timer.stop()
    synchronize()
    return host / calls, timer.stop() / calls


def measure_shape(name: str, args, device, dtype) -> dict:
    """Every arm of one shape: host, wall and device microseconds per call (median and range over rounds)."""
    import torch

    from relufy.sparse import eager_runs_dense, sparse_eager, sparse_enabled
    from relufy.timing import median_seconds

    hidden, inter = SHAPES[name]
    model, ffns, inputs, threshold = sparse_llama(hidden, inter, args.layers, args.sparsity, dtype, device)
    arms = {"dense": lambda: sparse_enabled(model, False), "sparse": lambda: sparse_eager(model)}
    if eager_runs_dense(model):  # the sparsified FFN's default eager call on CUDA
        arms["eager_dense"] = contextlib.nullcontext
    samples = {arm: {"host_us": [], "wall_us": []} for arm in arms}
    with torch.no_grad():
        for arm, context in arms.items():  # warm-up: Triton's first launches, cuBLAS handles, the allocator
            with context():
                time_calls(ffns, inputs, max(1, args.calls // 10), device)
        for round_ in range(args.rounds):
            for arm in (list(arms) if round_ % 2 == 0 else list(arms)[::-1]):
                with arms[arm]():
                    host, wall = time_calls(ffns, inputs, args.calls, device)
                samples[arm]["host_us"].append(1e6 * host)
                samples[arm]["wall_us"].append(1e6 * wall)
        device_us = {"eager_dense": None}
        for arm, context in list(arms.items())[:2]:
            with context():
                one_pass = median_seconds(lambda: [ffn(x) for ffn, x in zip(ffns, inputs)], device, args.replays)
            device_us[arm] = 1e6 * one_pass / len(ffns)
    row = {"shape": name, "hidden": hidden, "intermediate": inter, "fatrelu_threshold": threshold}
    for arm in arms:
        row[arm] = {key: statistics.median(values) for key, values in samples[arm].items()}
        row[arm].update({f"{key}_range": [min(values), max(values)] for key, values in samples[arm].items()})
        row[arm]["device_us"] = device_us[arm]
    row["sparse_over_dense"] = {key: row["sparse"][key] / row["dense"][key] for key in TIMES}
    row["extra_host_us"] = row["sparse"]["host_us"] - row["dense"]["host_us"]
    row["eager_check_us"] = row["eager_dense"]["host_us"] - row["dense"]["host_us"] if "eager_dense" in arms else None
    del model
    return row


def table(result: dict) -> str:
    """The markdown table of a measurement: per shape and arm, microseconds per call."""
    lines = ["| shape | arm | host us/call | wall us/call | device us/call (graph) |",
             "| --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        for arm in ("dense", "sparse", "eager_dense"):
            if arm in row:
                times, device = row[arm], row[arm]["device_us"]
                lines.append(f"| {row['shape']} | {arm} | {times['host_us']:.1f} | {times['wall_us']:.1f} | "
                             f"{'n/a' if device is None else f'{device:.1f}'} |")
        ratio = row["sparse_over_dense"]
        lines.append(f"| {row['shape']} | sparse/dense | {ratio['host_us']:.2f}x | {ratio['wall_us']:.2f}x | "
                     f"{ratio['device_us']:.2f}x |")
    extra = ", ".join(f"{row['shape']} {row['extra_host_us']:+.1f} us" for row in result["rows"])
    checks = ", ".join(f"{row['shape']} {row['eager_check_us']:+.1f} us" for row in result["rows"]
                       if row.get("eager_check_us") is not None)
    check = [f"eager check of a sparsified FFN that runs dense, over a dense call: {checks}"] if checks else []
    return "\n".join(lines + ["", f"extra host time per sparse FFN call: {extra}"] + check)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from relufy.speed import environment

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("this measures CUDA launches; without a GPU, run the --tiny smoke run")
    device = torch.device("cuda" if not args.tiny else "cpu")
    dtype = torch.bfloat16 if not args.tiny else torch.float32
    result = {**environment(device), "dtype": str(dtype).removeprefix("torch."), "batch": 1,
              "config": {key: getattr(args, key) for key in ("layers", "calls", "rounds", "replays", "sparsity")},
              "rows": [measure_shape(name, args, device, dtype) for name in args.shapes.split(",")]}
    print(table(result))
    if args.json:
        from relufy.atomic import write_json_atomically

        write_json_atomically(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
