"""Cost of distillation: ProSparse steps with the unconverted teacher against the same steps without it.

One process, one GPU (or the CPU), the same random-init ReLU student and random token blocks for
both (shapes and helpers from bench/train_overhead.py): `ProSparseTrainer` with a constant lambda,
once plain and once with a `relufy.distill.Distiller` whose teacher is a second random model of the
same shape with SiLU (a separate frozen model, as `distill: true` builds in full training). Runs
alternate in the given order. Prints the step-time ratio (goal <= 1.35) and the peak GPU memory
ratio, fastest against fastest and median against median.

    python bench/distill_overhead.py                                  # SmolLM2-135M shape, KL, bf16 autocast
    python bench/distill_overhead.py --liger --json out.json          # Liger: LM loss and divergence in one pass (CUDA)
    python bench/distill_overhead.py --liger --two-pass               # Liger: fused CE, then the fused linear JSD
    python bench/distill_overhead.py --liger --compile                # torch_compile: student and teacher compiled
    python bench/distill_overhead.py --loss jsd --temperature 2
    python bench/distill_overhead.py --tiny                           # CPU smoke run

On the CPU there is no bf16 autocast and no peak-memory figure (reported as null).
"""

from __future__ import annotations

import argparse
import statistics

import torch

# bench/ is on sys.path when this file runs as a script
from train_overhead import (CONFIGS, DEFAULT_BATCH, ON_GPU, build_model, device_name, peak_memory_gib, random_blocks,
                            reset_peak_memory, time_regularized_steps)

KINDS = ("plain", "distill")


def run(kind: str, args, blocks) -> dict:
    """One run: mean step time and peak allocated GPU memory (teacher included) of `kind`."""
    from relufy.configs import LIGER_MLP_KERNELS
    from relufy.distill import separate_teacher
    from relufy.divergence import DistillLoss

    reset_peak_memory()
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, dtype)
    extra = {}
    if kind == "distill":
        loss = DistillLoss(args.alpha, args.temperature, args.loss, args.jsd_beta)
        teacher = build_model(args.model, dtype, hidden_act="silu")
        extra["distiller"] = separate_teacher(loss, teacher, fused=args.liger, one_pass=not args.two_pass,
                                              liger_kernel_config=dict.fromkeys(LIGER_MLP_KERNELS, False),
                                              compile_options={} if args.compile else None)
    mean = time_regularized_steps(model, blocks, args, **extra)
    result = {"kind": kind, "step_s": mean, "tokens_per_s": args.batch_size * args.seq_len / mean,
              "peak_mem_gib": peak_memory_gib()}
    del model, extra
    return result


def summarize(runs: dict[str, list[dict]], args) -> dict:
    summary = {"device": device_name(), "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "dtype": args.dtype, "lambda": args.lam, "alpha": args.alpha, "temperature": args.temperature,
               "loss": args.loss, "liger": args.liger, "fused": args.liger,
               "one_pass": args.liger and not args.two_pass, "grad_ckpt": args.grad_ckpt,
               "compile": args.compile, "runs": runs,
               "ratio": None, "ratio_median": None, "memory_ratio": None}
    steps = {kind: [r["step_s"] for r in runs.get(kind, [])] for kind in KINDS}
    if all(steps.values()):
        summary["ratio"] = min(steps["distill"]) / min(steps["plain"])
        summary["ratio_median"] = statistics.median(steps["distill"]) / statistics.median(steps["plain"])
    peaks = {kind: max((r["peak_mem_gib"] or 0.0 for r in runs.get(kind, [])), default=0.0) for kind in KINDS}
    if peaks["plain"] and peaks["distill"]:
        summary["memory_ratio"] = peaks["distill"] / peaks["plain"]
    return summary


def report(summary: dict, args) -> None:
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len}, {args.dtype} weights"
          f"{' + bf16 autocast' if ON_GPU else ''}, lambda {args.lam:g}, {args.loss} alpha {args.alpha:g} "
          f"T {args.temperature:g}{liger_path(args) if args.liger else ', torch logits path'}"
          f"{', grad ckpt' if args.grad_ckpt else ''}{', compiled' if args.compile else ''} on {summary['device']}:")
    for kind in KINDS:
        runs = summary["runs"].get(kind, [])
        if not runs:
            continue
        best = min(runs, key=lambda r: r["step_s"])
        peak = "" if best["peak_mem_gib"] is None else f"  peak {max(r['peak_mem_gib'] for r in runs):.2f} GiB"
        print(f"  {kind:8s} {best['step_s'] * 1000:8.1f} ms/step (median "
              f"{statistics.median(r['step_s'] for r in runs) * 1000:.1f} over {len(runs)})  "
              f"{best['tokens_per_s']:10.0f} tokens/s{peak}")
    if summary["ratio"] is not None:
        print(f"  step time distill / plain: {summary['ratio']:.3f} fastest against fastest, "
              f"{summary['ratio_median']:.3f} median against median (goal <= 1.35)")
    if summary["memory_ratio"] is not None:
        print(f"  peak memory distill / plain: {summary['memory_ratio']:.3f}")


def liger_path(args) -> str:
    return ", Liger fused CE + fused linear JSD" if args.two_pass else ", Liger one pass (LM loss and divergence)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(CONFIGS), default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weight dtype of student and teacher (float32 = the recipes' fp32 master weights)")
    parser.add_argument("--lam", type=float, default=1e-3, help="lambda of both kinds of run")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--loss", choices=["kl", "jsd"], default="kl")
    parser.add_argument("--jsd-beta", type=float, default=0.5)
    parser.add_argument("--liger", action="store_true",
                        help="use_liger_kernel=True: Liger's kernels; the LM loss and divergence in one pass of Liger's "
                             "chunked JSD loss (CUDA)")
    parser.add_argument("--two-pass", action="store_true",
                        help="with --liger: the model's fused cross-entropy, then the fused linear JSD (the student's "
                             "LM head computed twice) instead of the one-pass loss")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    parser.add_argument("--compile", action="store_true",
                        help="torch_compile=True for both kinds of run; the teacher's forward is compiled too "
                             "(torch.compile, default mode), as a recipe's torch_compile: true does")
    parser.add_argument("--order", nargs="+", choices=KINDS, default=list(KINDS) * 3,
                        help="run order; ratios use the fastest run of each kind (and the medians)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: --model tiny --steps 2 --warmup 1")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.steps, args.warmup = "tiny", 2, 1
    if args.liger and not ON_GPU:
        parser.error("--liger needs a CUDA GPU")
    batch, seq = DEFAULT_BATCH[args.model]
    args.batch_size, args.seq_len = args.batch_size or batch, args.seq_len or seq
    args.profile = False  # a train_overhead.time_steps option this bench does not offer
    blocks = random_blocks((args.warmup + args.steps) * args.batch_size, args.seq_len, CONFIGS[args.model]["vocab_size"])
    runs: dict[str, list[dict]] = {}
    for kind in args.order:
        runs.setdefault(kind, []).append(run(kind, args, blocks))
    summary = summarize(runs, args)
    report(summary, args)
    if args.json:
        from relufy.atomic import write_json_atomically

        write_json_atomically(args.json, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
