"""End-to-end decode, dense against sparse, on a random model of a real shape (default Llama-2-7B).

The model is built from a config with random weights (bf16, on the GPU), its FFN activation set to
FATReLU with the threshold at the wanted quantile of the gate values (90% zeros by default), then
`relufy.sparse.sparsify` and `relufy.speed.measure_speed` run it in relufy's decode loop: the dense
and the sparse FFNs in the same CUDA-graph-captured loop, in one process.

    python bench/decode_speed.py --output bench/out/decode_speed.json
    python bench/decode_speed.py --tiny --output /tmp/decode_speed.json   # CPU smoke run
    python bench/decode_speed.py --batch-sizes 1 --new-tokens 64 --profile-steps 3 --output bench/out/decode-profile.json
    python bench/decode_speed.py --shape smollm2-135m --batch-sizes 1,4 --profile-steps 3 --output bench/out/decode-135m.json

`--dependent-launch on|off` times the same rows with every sparse FFN's second kernel launched as the
first's programmatic dependent, or plainly, whatever the tile table says (docs/inference.md, "Dependent
launch"); run both back to back on one GPU to compare:

    python bench/decode_speed.py --batch-sizes 1 --new-tokens 128 --generate-tokens 8 --dependent-launch off --output off.json
    python bench/decode_speed.py --batch-sizes 1 --new-tokens 128 --generate-tokens 8 --dependent-launch on --output on.json

`--profile-steps N` adds, per batch size, the profile of N decode steps of each arm, kernel by kernel
(`relufy.step_profile`), to the JSON (`profile`) and the printed report.

The JSON is rewritten (atomically) after every stage of the measurement, with "complete": false
until the end, so a run cut short by a time limit keeps the batch sizes that finished.

`--save-folder DIR` measures nothing: it writes the same random model for serving engines, as
DIR/fatrelu (hidden_act fatrelu_<t>) and DIR/silu (the same weights, hidden_act silu), without a
tokenizer: `vllm bench latency --skip-tokenizer-init --disable-detokenize` (docs/serving.md) feeds
random token ids.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import get_args

from relufy.options import CompileMode

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    # small models, whose decode step is bound by kernel latency more than by bytes
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=384),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's own)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of zeros the threshold is set for")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--generate-tokens", type=int, default=64, help="tokens for the HF generate number")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile this many decode steps of each arm per batch size (torch.profiler; 0: off)")
    parser.add_argument("--dependent-launch", choices=["table", "on", "off"], default="table",
                        help="launch every sparse FFN's second kernel as the first's programmatic dependent (on), "
                             "plainly (off), or as the tile table's row says (table)")
    parser.add_argument("--compile-mode", choices=get_args(CompileMode), default="default",
                        help="torch.compile mode of both arms' decode step and FFN sequences")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer model on CPU (Triton interpreter), batch 1 and 2, a few tokens")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", "-o", type=Path, help="JSON of the measurement")
    where.add_argument("--save-folder", type=Path, help="write DIR/fatrelu and DIR/silu instead of measuring")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from relufy.atomic import write_json_atomically
    from relufy.errors import DataError
    from relufy.report import speed_table
    from relufy.speed import SpeedConfig, measure_speed
    from relufy.sparse import sparsify

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    try:  # a bad number fails here, in one line, before a 7B model is built
        config = SpeedConfig(batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                             prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                             generate_tokens=args.generate_tokens, dtype=str(dtype).removeprefix("torch."),
                             device=device, profile_steps=args.profile_steps, compile_mode=args.compile_mode)
    except (DataError, ValueError) as error:
        raise SystemExit(f"decode_speed.py: {error}") from None
    shape = dict(SHAPES["tiny" if args.tiny else args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.dependent_launch != "table":
        set_dependent_launch(args.dependent_launch == "on")
    model = random_llama(shape, dtype, device)
    threshold = set_fatrelu_for(model, args.sparsity, args.prompt_tokens)
    if args.save_folder:
        save_for_serving(model, args.save_folder)
        print(f"FATReLU threshold {threshold:.4g} for {args.sparsity:.0%} zeros; wrote {args.save_folder}/fatrelu "
              f"and {args.save_folder}/silu")
        return 0
    if args.tiny:
        config = SpeedConfig(batch_sizes=(1, 2), prompt_tokens=8, new_tokens=4, generate_tokens=2, warmup=1,
                             ffn_repeats=1, dtype="float32", device="cpu", profile_steps=args.profile_steps)
    about = dict(model=f"random {'tiny' if args.tiny else args.shape}", fatrelu_threshold=threshold,
                 target_sparsity=args.sparsity, dependent_launch=args.dependent_launch)
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def save(partial: dict, complete: bool = False) -> None:
        write_json_atomically(args.output, {**partial, **about, "complete": complete})

    result = measure_speed(sparsify(model), config, on_update=save)
    save(result, complete=True)
    result.update(about)
    print(speed_table(result))
    print(f"FATReLU threshold {threshold:.4g} for {args.sparsity:.0%} zeros; wrote {args.output}")
    return 0


def set_dependent_launch(flag: bool) -> None:
    """Every tile row of this process, every GPU family and width, with `dependent_launch` set to `flag`:
    the same kernels and tiles timed with and without the launch gap a dependent launch removes."""
    from relufy.sparse.kernels import tiles

    for table in (tiles.TILE_TABLE, tiles.NARROW_TILE_TABLE):
        for rows in table.values():
            for row in rows.values():
                row["dependent_launch"] = flag


def random_llama(shape: dict, dtype, device):
    """A Llama with random weights, built directly on `device` in `dtype`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_act="relu", max_position_embeddings=4096,
                                  attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def set_fatrelu_for(model, sparsity: float, tokens: int) -> float:
    """Set every FFN to FATReLU with the threshold at the `sparsity` quantile of the gate values
    on random tokens; the config's activation says so too, as `relufy convert` would write it."""
    import torch

    from relufy.architectures import ffn_modules

    gates = []
    handles = [ffn.gate_proj.register_forward_hook(lambda module, args, out: gates.append(out.flatten().float()))
               for ffn in ffn_modules(model)]
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids.to(model.device))
    for handle in handles:
        handle.remove()
    return use_fatrelu(model, torch.cat(gates), sparsity)


def use_fatrelu(model, gates, sparsity: float) -> float:
    """Every FFN of `model` (and its config) to FATReLU with the threshold at the `sparsity` quantile of
    `gates` (gate values, one flat tensor; at most 2^24 of them sampled); returns the threshold."""
    import torch

    from relufy.activations import make_activation
    from relufy.architectures import architecture_of, ffn_modules

    sample = gates[torch.randperm(gates.numel(), device=gates.device)[: 1 << 24]]
    threshold = max(float(torch.quantile(sample.cpu(), sparsity)), 0.0)
    activation = make_activation("fatrelu", threshold=threshold)
    for ffn in ffn_modules(model):
        ffn.act_fn = activation.module()
    architecture_of(model.config).with_activation(model.config, activation.config_value)
    return threshold


def save_for_serving(model, folder: Path) -> None:
    """`model` as folder/fatrelu, and with hidden_act silu as folder/silu (vLLM's own Llama class)."""
    activation = model.config.hidden_act
    for name, hidden_act in (("fatrelu", activation), ("silu", "silu")):
        model.config.hidden_act = hidden_act
        model.save_pretrained(folder / name)
    model.config.hidden_act = activation


if __name__ == "__main__":
    sys.exit(main())
