"""Cost of ProSparse's L1 term: optimizer steps with lambda > 0 against plain causal-LM training.

One process, one GPU (or the CPU), the same random-init model and the same random token blocks
for both: plain `transformers.Trainer` versus relufy's `ProSparseTrainer` (probe attached, constant
lambda). Prints the step-time ratio (target <= 1.03), tokens/s and MFU (target >= 40% for the
1B config under bf16 on a GPU).

    python bench/train_overhead.py                      # both models, bf16 autocast on fp32 weights
    python bench/train_overhead.py --model llama-1b --dtype bfloat16 --json out.json
    python bench/train_overhead.py --model tiny --steps 2 --warmup 1 --order plain prosparse   # CPU smoke run

On the CPU there is no bf16 autocast and no peak-memory figure (reported as null); the ratio
still compares the two trainers in the same process.

MFU counts 6 * (non-embedding parameters + lm_head) + 12 * layers * hidden * seq_len FLOPs per
token (the PaLM convention, causal attention counted in full) against --peak-tflops.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile

import torch
from transformers import TrainerCallback

CONFIGS = {
    # SmolLM2-135M's shape (the embedded default model), ReLU.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # A ~1.1B Llama (TinyLlama's shape), ReLU.
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    # Two narrow layers: a smoke run of this script on any CPU in seconds.
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
REAL_MODELS = ("smollm2-135m", "llama-1b")  # what --model all runs
DEFAULT_BATCH = {"smollm2-135m": (8, 2048), "llama-1b": (4, 2048), "tiny": (2, 32)}
ON_GPU = torch.cuda.is_available()


def synchronize() -> None:
    """Wait for queued GPU work (a no-op on the CPU), so a wall-clock stamp means the work is done."""
    if ON_GPU:
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """Peak allocated GPU memory since the last reset; None on the CPU (no allocator statistics)."""
    return torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else None


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu"


def build_model(name: str, dtype: torch.dtype, hidden_act: str = "relu"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_act=hidden_act, max_position_embeddings=4096, **CONFIGS[name])
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to("cuda" if ON_GPU else "cpu")


def flops_per_token(model, seq_len: int) -> float:
    config = model.config
    embedding = config.vocab_size * config.hidden_size
    params = sum(p.numel() for p in model.parameters())
    matmul = params - embedding + (embedding if config.tie_word_embeddings else 0)  # lm_head is a matmul
    return 6 * matmul + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def random_blocks(count: int, seq_len: int, vocab: int):
    import datasets

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (count, seq_len), generator=generator)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def time_steps(trainer_cls, model, blocks, args, extra: dict) -> float:
    """Mean seconds per optimizer step over steps warmup+1 .. warmup+steps.

    The GPU is synchronised only at the two ends of the timed window, so the CPU may run ahead
    as in real training (a per-step sync would hide a trainer's own host syncs).
    """
    from transformers import TrainingArguments

    from relufy.configs import LIGER_MLP_KERNELS
    from relufy.train import collate_blocks

    from relufy.timing import Timer

    window = Timer()  # the host clock, the GPU synchronised at both ends of the window

    class TimedWindow(TrainerCallback):
        def on_step_end(self, _args, state, *_, **__):
            if state.global_step in (args.warmup, args.warmup + args.steps):
                synchronize()
                if state.global_step == args.warmup:
                    window.start()
                else:
                    window.stop()

    callbacks = [TimedWindow()]
    if args.profile:
        callbacks.append(KernelProfile(start=args.warmup, steps=3, label=trainer_cls.__name__))

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, learning_rate=1e-5, lr_scheduler_type="constant",
            optim="adamw_torch_fused" if ON_GPU else "adamw_torch", use_cpu=not ON_GPU,
            # logging_first_step: with --compile, a logging step's forward (zeros counted) is a second graph;
            # compiling it in the warm-up keeps compilation out of the timed window
            bf16=ON_GPU, logging_steps=10, logging_first_step=True, save_strategy="no", report_to=[], disable_tqdm=True,
            gradient_checkpointing=args.grad_ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
            torch_compile=args.compile, dataloader_num_workers=2 if ON_GPU else 0, seed=0,
            use_liger_kernel=args.liger, liger_kernel_config=dict.fromkeys(LIGER_MLP_KERNELS, False))
        trainer = trainer_cls(model=model, args=training, train_dataset=blocks, data_collator=collate_blocks,
                              callbacks=callbacks, **extra)
        trainer.train()
    return window.seconds / args.steps


class KernelProfile(TrainerCallback):
    """Profile `steps` optimizer steps from step `start`; print the kernels taking the most GPU time."""

    def __init__(self, *, start: int, steps: int, label: str):
        self.start, self.steps, self.label, self.profiler = start, steps, label, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.profiler.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.start + self.steps:
            torch.cuda.synchronize()
            self.profiler.stop()
            print(f"-- {self.label}: GPU kernels over {self.steps} steps")
            print(self.profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
            self.profiler = None


def time_regularized_steps(model, blocks, args, **extra) -> float:
    """Mean step time of ProSparseTrainer with a constant lambda = args.lam (probe attached as in training);
    `extra` goes to the trainer too (e.g. a distiller)."""
    from relufy.schedule import Schedule
    from relufy.trainer import ProSparseTrainer

    schedule = Schedule.from_config([{"lambda": args.lam, "end_step": args.warmup + args.steps}])
    return time_steps(ProSparseTrainer, model, blocks, args, {"schedule": schedule, **extra})


def bench(name: str, args) -> dict:
    from transformers import Trainer

    batch, seq = DEFAULT_BATCH[name]
    args.batch_size = args.batch_size_override or batch
    seq = args.seq_len or seq
    dtype = getattr(torch, args.dtype)
    blocks = random_blocks((args.warmup + args.steps) * args.batch_size, seq, CONFIGS[name]["vocab_size"])
    tokens = args.batch_size * seq
    result = {"model": name, "batch_size": args.batch_size, "seq_len": seq, "dtype": args.dtype,
                "grad_ckpt": args.grad_ckpt, "compile": args.compile, "liger": args.liger, "lambda": args.lam,
              "device": device_name()}
    for label in args.order:
        model = build_model(name, dtype)
        result["params"] = sum(p.numel() for p in model.parameters())
        flops = flops_per_token(model, seq)
        if label == "plain":
            mean = time_steps(Trainer, model, blocks, args, {})
        else:
            mean = time_regularized_steps(model, blocks, args)
        result.setdefault(label, []).append({"step_s": mean, "tokens_per_s": tokens / mean,
                                             "mfu": tokens * flops / mean / (args.peak_tflops * 1e12),
                                             "peak_mem_gib": peak_memory_gib()})
        del model
        reset_peak_memory()
    plain = [r["step_s"] for r in result["plain"]]
    l1 = [r["step_s"] for r in result["prosparse"]]
    result["ratio"] = min(l1) / min(plain)
    result["ratio_median"] = statistics.median(l1) / statistics.median(plain)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=[*CONFIGS, "all"], default="all",
                        help="all = " + " and ".join(REAL_MODELS) + "; tiny = a smoke run for any CPU")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", dest="batch_size_override", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weight dtype; bf16 autocast is always on (float32 = the recipes' fp32 master weights)")
    parser.add_argument("--lam", type=float, default=1e-3, help="lambda of the regularized runs")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    parser.add_argument("--compile", action="store_true", help="torch_compile=True in TrainingArguments")
    parser.add_argument("--liger", action="store_true",
                        help="use_liger_kernel=True: Liger's RMSNorm, RoPE and fused linear cross-entropy (not its MLP)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top GPU kernels of 3 steps per run (diagnosis only: it slows the timed steps)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--order", nargs="+", default=["plain", "prosparse"] * 3,
                        help="run order; the ratio uses the fastest run of each kind (and the median, printed too)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not ON_GPU and (args.liger or args.profile):
        parser.error("--liger and --profile need a CUDA GPU")
    results = []
    for name in REAL_MODELS if args.model == "all" else [args.model]:
        result = bench(name, args)
        results.append(result)
        best = {kind: max(result[kind], key=lambda r: r["tokens_per_s"]) for kind in ("plain", "prosparse")}
        print(f"{name} ({result['params'] / 1e6:.0f}M params, batch {result['batch_size']} x {result['seq_len']}, "
              f"{args.dtype} weights + bf16 autocast{', grad ckpt' if args.grad_ckpt else ''}"
              f"{', compiled' if args.compile else ''}{', Liger' if args.liger else ''}) on {result['device']}:")
        for kind in ("plain", "prosparse"):
            r = best[kind]
            peak = "" if r["peak_mem_gib"] is None else f"  peak {r['peak_mem_gib']:.1f} GiB"
            print(f"  {kind:9s} {r['step_s'] * 1000:8.1f} ms/step  {r['tokens_per_s']:10.0f} tokens/s  "
                  f"MFU {r['mfu']:.1%}{peak}")
        runs = len(result["plain"])
        print(f"  overhead ratio (lambda={args.lam:g} vs plain): {result['ratio']:.3f} fastest against fastest"
              + (f", {result['ratio_median']:.3f} median against median of {runs} runs each" if runs > 1 else ""))
    if args.json:
        from relufy.atomic import write_json_atomically

        write_json_atomically(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
