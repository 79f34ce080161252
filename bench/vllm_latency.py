"""`vllm bench latency` on relufy's vLLM plugin: its sparse FFN path, its dense path, and vLLM's own SiLU class.

Three arms, each batch size its own `vllm bench latency` process on one GPU:

- sparse: DIR/fatrelu (hidden_act fatrelu_<t>, 90% zeros) through the plugin, sparse FFN at decode;
- dense:  the same folder with RELUFY_VLLM_SPARSE=0, the plugin's FFN through vLLM's dense linears;
- silu:   DIR/silu, the same weights with hidden_act silu, in vLLM's own Llama class.

sparse speed-up = dense / sparse latency (target >= 1.3x at batch 1) is what the sparse kernels buy;
dense vs silu = silu / dense latency (target >= 0.98x) is what the plugin costs when it is not sparse.
DIR comes from `python bench/decode_speed.py --save-folder DIR` (random Llama-2-7B-shaped weights, no
tokenizer: the runs pass --skip-tokenizer-init --disable-detokenize and feed random token ids).

    python bench/decode_speed.py --save-folder runs/llama2-7b
    python bench/vllm_latency.py --model-dir runs/llama2-7b --out bench/out/vllm
    python bench/vllm_latency.py --summarize-only --out docs/results/serving/h200 \\
        --device "NVIDIA H200" --torch-version 2.11.0+cu130      # the table and summary again, nothing run

Each run writes OUT/vllm-<arm>-b<batch>.json (vLLM's own --output-json) and .log (its output); an arm
whose JSON exists is skipped unless --force, so a run cut short goes on where it stopped. A failed arm
prints the tail of its log, the others still run, and the script exits 1 at the end. Every arm has its
own VLLM_CACHE_ROOT under OUT, so each compiles from scratch into a cache that goes with OUT (the plugin
also puts its sparse choice into vLLM's compile cache key, so a shared root would be safe too).
OUT/summary.json holds the latencies, the ratios, the GPU, torch and vLLM (the version the engine prints
in each log); OUT/summary.txt the table printed. The summary covers every per-arm JSON in OUT, whatever run wrote it:
give each setting (lengths, iterations, model) an OUT of its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ARMS = {"sparse": "fatrelu", "dense": "fatrelu", "silu": "silu"}  # arm: model folder under --model-dir
SPARSE_SWITCH = "RELUFY_VLLM_SPARSE"  # the plugin's sparse decode path; "0" turns it off
RESULT = re.compile(r"vllm-(\w+)-b(\d+)\.json")
ENGINE_VERSION = re.compile(r"Initializing a V1 LLM engine \(v([^)]+)\)")  # vLLM's own line in every log
LOG_TAIL_LINES = 25


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path,
                        help="folder holding fatrelu/ and silu/ (bench/decode_speed.py --save-folder)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the per-arm JSONs and logs and the summary")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=256,
                        help="new tokens after the prompt (with --summarize-only: the measured run's, for ms/token)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per arm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before them")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    parser.add_argument("--force", action="store_true", help="run arms whose JSON exists again")
    parser.add_argument("--summarize-only", action="store_true",
                        help="run nothing: the table and summary of the JSONs and logs already in --out")
    parser.add_argument("--device",
                        help="with --summarize-only: the GPU the folder was measured on (its logs do not say)")
    parser.add_argument("--torch-version", help="with --summarize-only: the torch it was measured with (idem)")
    args = parser.parse_args(argv)
    if not args.summarize_only and args.model_dir is None:
        parser.error("--model-dir is required (or --summarize-only)")
    if not args.summarize_only and (args.device or args.torch_version):
        parser.error("--device and --torch-version are for --summarize-only; a run records its own")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    failed = []
    if not args.summarize_only:
        if problem := missing_input(args.model_dir, args.arms):
            print(f"vllm_latency.py: {problem}", file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        failed = [(arm, batch) for batch in args.batch_sizes for arm in args.arms if not run_arm(arm, batch, args)]
    latencies = read_latencies(args.out)
    if not latencies:
        print(f"vllm_latency.py: no vllm-<arm>-b<batch>.json in {args.out}", file=sys.stderr)
        return 2 if args.summarize_only else 1
    summary = {**environment(args), "vllm": vllm_version(args.out), **summarize(latencies, args.output_len)}
    if not args.summarize_only:
        summary["settings"] = dict(model_dir=str(args.model_dir), input_len=args.input_len, iters=args.iters,
                                   warmup=args.warmup, gpu_memory_utilization=args.gpu_memory_utilization)
    text = table(summary)
    write_summary(args.out, summary, text)
    print(text)
    print(f"{summary['device']}, torch {summary['torch']}, vLLM {summary['vllm']}; wrote {args.out}/summary.json")
    if failed:
        print("failed: " + ", ".join(f"{arm} b{batch}" for arm, batch in failed), file=sys.stderr)
    return 1 if failed else 0


def missing_input(model_dir: Path, arms: list[str]) -> str | None:
    """Why the arms cannot run, in one line (a missing model folder, no vLLM here), or None."""
    for folder in sorted({ARMS[arm] for arm in arms}):
        if not (model_dir / folder / "config.json").is_file():
            return (f"no model in {model_dir / folder}; write it with: "
                    f"python bench/decode_speed.py --save-folder {model_dir}")
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed for {sys.executable}"
    return None


def arm_command(arm: str, batch: int, args) -> list[str]:
    """The `vllm bench latency` command line of one arm at one batch size (this interpreter's vLLM)."""
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "latency",
            "--model", str(args.model_dir / ARMS[arm]), "--skip-tokenizer-init", "--disable-detokenize",
            "--batch-size", str(batch), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--num-iters-warmup", str(args.warmup), "--num-iters", str(args.iters),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--output-json", str(args.out / f"vllm-{arm}-b{batch}.json")]


def arm_env(arm: str, out: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one arm: the sparse switch off for dense only (unset otherwise, so a value
    left in the shell cannot turn the sparse arm dense), and a compile cache of the arm's own."""
    env = dict(os.environ if base is None else base)
    env.pop(SPARSE_SWITCH, None)
    if arm == "dense":
        env[SPARSE_SWITCH] = "0"
    env["VLLM_CACHE_ROOT"] = str((out / "vllm-cache" / arm).resolve())
    return env


def run_arm(arm: str, batch: int, args) -> bool:
    """Run one arm unless its JSON is there (and no --force); False when it failed. A failed run's JSON
    is removed, so that a rerun does not take it for done."""
    result, log = args.out / f"vllm-{arm}-b{batch}.json", args.out / f"vllm-{arm}-b{batch}.log"
    if result.exists() and not args.force:
        print(f"== {arm} b{batch}: done before ({result})", flush=True)
        return True
    result.unlink(missing_ok=True)
    print(f"== {arm} b{batch}: {' '.join(arm_command(arm, batch, args)[1:])}", flush=True)
    with log.open("w") as handle:
        code = subprocess.run(arm_command(arm, batch, args), env=arm_env(arm, args.out), stdout=handle,
                              stderr=subprocess.STDOUT).returncode
    if code == 0 and result.exists():
        print(f"   {json.loads(result.read_text())['avg_latency']:.3f} s", flush=True)
        return True
    result.unlink(missing_ok=True)
    tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    print(f"   failed (exit {code}); the end of {log}:\n" + "\n".join(f"   | {line}" for line in tail), flush=True)
    return False


def read_latencies(folder: Path) -> dict[tuple[int, str], float]:
    """Mean latency (s) of every vllm-<arm>-b<batch>.json in `folder`, by (batch, arm)."""
    latencies = {}
    for path in folder.glob("vllm-*-b*.json"):
        if match := RESULT.fullmatch(path.name):
            latencies[int(match[2]), match[1]] = json.loads(path.read_text())["avg_latency"]
    return latencies


def summarize(latencies: dict[tuple[int, str], float], output_len: int) -> dict:
    """One row per batch size: each arm's mean latency and ms per new token, and the two ratios (None
    where an arm is missing)."""
    rows = []
    for batch in sorted({batch for batch, _ in latencies}):
        seconds = {arm: latencies.get((batch, arm)) for arm in ARMS}
        sparse, dense, silu = seconds.values()
        rows.append({"batch": batch, "latency_s": seconds,
                     "ms_per_token": {arm: None if s is None else 1000 * s / output_len for arm, s in seconds.items()},
                     "sparse_speedup": dense / sparse if sparse and dense else None,
                     "dense_vs_silu": silu / dense if dense and silu else None})
    return {"output_len": output_len, "rows": rows}


def table(summary: dict) -> str:
    """The printed table (summary.txt): latencies, ms per new token, the ratios."""
    def cell(value, unit=""):
        return "-" if value is None else f"{value:.3f}{unit}"

    lines = [f"vllm bench latency: mean of the measured iterations, {summary['output_len']} new tokens "
             "after the prompt",
             f"{'batch':>5} {'sparse s':>9} {'dense s':>9} {'silu s':>9} {'ms/token sparse':>16} {'dense':>7}"
             f" {'silu':>7} {'sparse speed-up':>16} {'dense vs silu':>14}"]
    for row in summary["rows"]:
        s, d, u = row["latency_s"].values()
        per = list(row["ms_per_token"].values())
        lines.append(f"{row['batch']:>5} {cell(s):>9} {cell(d):>9} {cell(u):>9} {cell(per[0]):>16} {cell(per[1]):>7}"
                     f" {cell(per[2]):>7} {cell(row['sparse_speedup'], 'x'):>16} {cell(row['dense_vs_silu'], 'x'):>14}")
    lines.append("sparse speed-up = dense / sparse latency (target >= 1.3x at batch 1);"
                 " dense vs silu = silu / dense latency (target >= 0.98x)")
    return "\n".join(lines)


def environment(args) -> dict:
    """The GPU and torch: this process's after a run (the arms ran on this interpreter and GPU), the
    ones passed with --summarize-only (None if not passed: a folder's logs do not name them)."""
    if args.summarize_only:
        return {"device": args.device, "torch": args.torch_version,
                "recorded_from": "device and torch as passed to --summarize-only; vllm from the engine's logs"}
    import torch

    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "recorded_from": "the process that ran the arms; vllm from the engine's logs"}


def vllm_version(folder: Path) -> str | None:
    """The vLLM version the engine printed in the folder's logs (several, comma-separated, if they differ)."""
    versions = {match for log in folder.glob("vllm-*-b*.log")
                for match in ENGINE_VERSION.findall(log.read_text(errors="replace"))}
    return ", ".join(sorted(versions)) or None


def write_summary(folder: Path, summary: dict, text: str) -> None:
    from relufy.atomic import write_json_atomically, write_text_atomically

    write_json_atomically(folder / "summary.json", summary)
    write_text_atomically(folder / "summary.txt", text + "\n")


if __name__ == "__main__":
    sys.exit(main())
