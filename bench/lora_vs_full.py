"""LoRA mode against full training: peak GPU memory ratio and the L1 term's step-time overhead under LoRA.

One process, one GPU (or the CPU), random-init model and random token blocks (shapes from
bench/train_overhead.py).
Three kinds of run, each on a fresh model, with the same batch, bf16 autocast and (by default)
non-reentrant gradient checkpointing, as the recipes use:

- full:      ProSparseTrainer on all weights (--full-dtype weights, fp32 = the full recipes' masters);
- lora:      ProSparseTrainer on LoRA adapters (frozen base in --base-dtype, bf16 = the LoRA recipes);
- lora-plain: plain `transformers.Trainer` on the same LoRA model (no probe, no L1).

Prints peak GPU memory of lora / full (target <= 0.5; GPU only, null on the CPU) and step time
of lora / lora-plain (target <= 1.03, like the full recipe's overhead in bench/train_overhead.py),
fastest against fastest, with the spread of every kind's runs.

    python bench/lora_vs_full.py                       # llama-1b, rank 16 on the FFN projections
    python bench/lora_vs_full.py --targets all-linear --rank 64 --json out.json
    python bench/lora_vs_full.py --model tiny --steps 2 --warmup 1 --order full lora lora-plain   # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import types

import torch

# bench/ is on sys.path when this file runs as a script
from train_overhead import (CONFIGS, DEFAULT_BATCH, build_model, device_name, peak_memory_gib, random_blocks,
                            reset_peak_memory, time_regularized_steps, time_steps)


def lora_args(args) -> types.SimpleNamespace:
    """The recipe keys `relufy.lora.wrap_with_lora` reads."""
    targets = None if args.targets == "ffn" else [args.targets] if args.targets == "all-linear" \
        else args.targets.split(",")
    return types.SimpleNamespace(use_peft=True, lora_r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                 lora_target_modules=targets, lora_modules_to_save=None, load_in_4bit=False)


def run(kind: str, args, blocks) -> dict:
    """One run of `kind`: mean step time, tokens/s and peak allocated GPU memory."""
    from transformers import Trainer

    from relufy.lora import wrap_with_lora

    reset_peak_memory()
    dtype = getattr(torch, args.full_dtype if kind == "full" else args.base_dtype)
    model = build_model(args.model, dtype)
    if kind != "full":
        model = wrap_with_lora(model, lora_args(args), gradient_checkpointing=args.grad_ckpt, seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if kind == "lora-plain":
        mean = time_steps(Trainer, model, blocks, args, {})
    else:
        mean = time_regularized_steps(model, blocks, args)
    result = {"kind": kind, "step_s": mean, "tokens_per_s": args.batch_size * args.seq_len / mean,
              "peak_mem_gib": peak_memory_gib(), "trainable_params": trainable}
    del model
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(CONFIGS), default="llama-1b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="ffn",
                        help="'ffn' (the recipe default: gate/up/down), 'all-linear', or comma-separated names")
    parser.add_argument("--base-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="frozen base weights in LoRA mode")
    parser.add_argument("--full-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights of full training (float32 = fp32 master weights + bf16 autocast)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--lam", type=float, default=1e-3, help="lambda of the regularized runs")
    parser.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false",
                        help="turn gradient checkpointing off (on by default, as in the recipes)")
    parser.add_argument("--order", nargs="+", default=["full", "lora", "lora-plain", "lora", "lora-plain"],
                        help="run order; each kind's fastest run and largest peak are reported")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    batch, seq = DEFAULT_BATCH[args.model]
    args.batch_size, args.seq_len = args.batch_size or batch, args.seq_len or seq
    # train_overhead.time_steps options this bench does not offer (a new one there fails the smoke test here)
    args.compile = args.profile = args.liger = False
    vocab = CONFIGS[args.model]["vocab_size"]
    blocks = random_blocks((args.warmup + args.steps) * args.batch_size, args.seq_len, vocab)

    runs: dict[str, list[dict]] = {}
    for kind in args.order:
        runs.setdefault(kind, []).append(run(kind, args, blocks))
    best = {kind: min(rs, key=lambda r: r["step_s"]) for kind, rs in runs.items()}
    peak = {kind: max(r["peak_mem_gib"] or 0.0 for r in rs) or None for kind, rs in runs.items()}
    spread = {kind: {"min_s": min(r["step_s"] for r in rs), "median_s": statistics.median(r["step_s"] for r in rs),
                     "max_s": max(r["step_s"] for r in rs)} for kind, rs in runs.items()}
    summary = {"device": device_name(), "model": args.model, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "rank": args.rank, "targets": args.targets, "base_dtype": args.base_dtype,
               "full_dtype": args.full_dtype, "grad_ckpt": args.grad_ckpt, "lambda": args.lam, "runs": runs, "spread": spread,
               "memory_ratio": None, "l1_overhead_ratio": None, "l1_overhead_ratio_median": None}
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len}, bf16 autocast"
          f"{', grad ckpt' if args.grad_ckpt else ''}, LoRA r={args.rank} on {args.targets} "
          f"({args.base_dtype} base) vs full ({args.full_dtype} weights), on {summary['device']}:")
    for kind, r in best.items():
        memory = "" if peak[kind] is None else f"  peak {peak[kind]:6.2f} GiB"
        print(f"  {kind:10s} {r['step_s'] * 1000:8.1f} ms/step (median {spread[kind]['median_s'] * 1000:.1f}, "
              f"max {spread[kind]['max_s'] * 1000:.1f} over {len(runs[kind])})  {r['tokens_per_s']:9.0f} tokens/s"
              f"{memory}  trainable {r['trainable_params'] / 1e6:8.1f}M")
    if peak.get("full") and peak.get("lora"):
        summary["memory_ratio"] = peak["lora"] / peak["full"]
        print(f"  peak memory lora / full: {summary['memory_ratio']:.3f} (target <= 0.5)")
    if "lora" in best and "lora-plain" in best:
        summary["l1_overhead_ratio"] = best["lora"]["step_s"] / best["lora-plain"]["step_s"]
        summary["l1_overhead_ratio_median"] = spread["lora"]["median_s"] / spread["lora-plain"]["median_s"]
        print(f"  step time lora (lambda={args.lam:g}) / lora-plain: {summary['l1_overhead_ratio']:.3f} fastest "
              f"against fastest, {summary['l1_overhead_ratio_median']:.3f} median against median (target <= 1.03)")
    if args.json:
        from relufy.atomic import write_json_atomically

        write_json_atomically(args.json, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
