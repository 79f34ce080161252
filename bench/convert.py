"""Benchmark: conversion of a sharded safetensors checkpoint vs plainly copying the same files.

Builds a checkpoint with Llama-2-7B shapes (fp16, 32 layers, ~13.5 GB; `--layers N` for a
proportional smaller one), then times `relufy convert` (a child process) against `cp -r` of the
same folder, alternating and keeping the best of `--repeats`. Prints the time ratio and the
conversion's peak RSS. `--size tiny` builds a ~0.2 MB checkpoint of the same layout (several
shards and an index) for a smoke run; its ratio measures process start-up, not copying.

    python bench/convert.py [--layers 32] [--workdir bench/out/convert] [--repeats 2] [--json out.json]
    python bench/convert.py --size tiny --layers 2 --repeats 1    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# name -> (hidden, intermediate, vocab, attention heads, shard size in bytes)
SIZES = {"llama2-7b": (4096, 11008, 32000, 32, 2 * 1024**3), "tiny": (64, 128, 256, 4, 64 * 1024)}


def llama_tensors(size: str, layers: int):
    """(name, shape) of every tensor of a Llama checkpoint of `size`, in checkpoint order."""
    hidden, intermediate, vocab, _, _ = SIZES[size]
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{name}.weight", (hidden, hidden)
        yield p + "mlp.gate_proj.weight", (intermediate, hidden)
        yield p + "mlp.up_proj.weight", (intermediate, hidden)
        yield p + "mlp.down_proj.weight", (hidden, intermediate)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def build_checkpoint(folder: Path, size_name: str, layers: int) -> int:
    """Write the sharded checkpoint one shard at a time (never more than one in memory); return its size."""
    hidden, intermediate, vocab, heads, shard_bytes = SIZES[size_name]
    folder.mkdir(parents=True)
    groups, current, size = [], [], 0
    for name, shape in llama_tensors(size_name, layers):
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for index, group in enumerate(groups, 1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: torch.full(shape, 0.01, dtype=torch.float16) for name, shape in group},
                  folder / file, metadata={"format": "pt"})
        total += (folder / file).stat().st_size
        weight_map.update({name: file for name, _ in group})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def timed(command: list[str]) -> tuple[float, float]:
    """Run a command; return its wall time (s) and its own peak RSS (MB)."""
    from relufy.timing import Timer

    with Timer() as timer:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
    elapsed = timer.seconds
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="llama2-7b", help="tensor shapes (tiny: a smoke run)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/convert"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the timings here")
    parser.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.build_only:
        build_checkpoint(args.build_only, args.size, args.layers)
        return
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    src = args.workdir / f"{args.size}-shapes"
    from relufy.timing import Timer

    build = Timer().start()
    # built in a child process, so this one stays small: a child's peak RSS counts its parent's pages until exec
    subprocess.run([sys.executable, __file__, "--size", args.size, "--layers", str(args.layers),
                    "--build-only", str(src)], check=True)
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"built {src}: {total / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} shards "
          f"({build.stop():.0f} s)")

    relufy = [sys.executable, "-m", "relufy", "convert", str(src)]
    copies, converts, peak_rss_mb = [], [], 0.0
    for attempt in range(args.repeats):
        copy_dir, out_dir = args.workdir / f"copy{attempt}", args.workdir / f"converted{attempt}"
        copies.append(timed(["cp", "-r", str(src), str(copy_dir)])[0])
        seconds, rss = timed(relufy + [str(out_dir)])
        converts.append(seconds)
        peak_rss_mb = max(peak_rss_mb, rss)
        shutil.rmtree(copy_dir)
        shutil.rmtree(out_dir)
    print(f"copy (cp -r): best {min(copies):.2f} s of {[round(t, 2) for t in copies]}")
    print(f"relufy convert: best {min(converts):.2f} s of {[round(t, 2) for t in converts]}")
    print(f"ratio convert/copy: {min(converts) / min(copies):.3f}  (target <= 1.1)")
    print(f"peak RSS of relufy convert: {peak_rss_mb:.0f} MB  (target < 1024)")
    if args.json:
        from relufy.atomic import write_json_atomically

        write_json_atomically(args.json, {
            "size": args.size, "layers": args.layers, "checkpoint_bytes": total, "copy_s": copies,
            "convert_s": converts, "ratio": min(converts) / min(copies), "peak_rss_mb": peak_rss_mb})
    shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
