"""The `relufy` command: argument parsing and error reporting only; each subcommand calls one module."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import RelufyError

logger = logging.getLogger("relufy")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="swap the FFN activation of a checkpoint for ReLU (or a variant)",
                       description="Write a copy of SRC (directory, .gguf file or hub id) to OUT with a ReLU-family "
                                   "FFN activation. SRC is never modified.")
    p.add_argument("src", help="checkpoint directory, .gguf file, or hub id (org/name)")
    p.add_argument("out", help="output directory (must not exist unless --force)")
    p.add_argument("--activation", "-a", default="relu", help="relu (default), fatrelu, shifted_relu, relu2")
    p.add_argument("--threshold", type=float, help="FATReLU threshold t: x if x >= t else 0")
    p.add_argument("--shift", type=float, help="shifted ReLU offset b: max(x - b, 0)")
    p.add_argument("--force", action="store_true", help="replace OUT; convert even if SRC already uses the activation")
    p.add_argument("--link", action="store_true", help="hard-link weight files instead of copying (same filesystem)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype when dequantizing a GGUF source (default float32)")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from .activations import make_activation
    from .convert import convert_checkpoint

    activation = make_activation(args.activation, threshold=args.threshold, shift=args.shift)
    out = convert_checkpoint(args.src, args.out, activation, force=args.force, link=args.link, dtype=args.dtype)
    print(f"wrote {out} (activation: {activation.config_value})")
    return 0


def _add_sparsity(sub) -> None:
    p = sub.add_parser("sparsity", help="measure the activation sparsity of x1 (FFN down-projection input)",
                       description="Run MODEL over text and report the fraction of exact zeros in the FFN "
                                   "intermediate activation, per layer and overall, plus perplexity.")
    p.add_argument("model", help="checkpoint directory, .gguf file or hub id")
    p.add_argument("--data", required=True, help=".txt/.jsonl file, folder of .txt files, or a datasets name")
    p.add_argument("--split", default="train", help="dataset split for a datasets name")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens to run (default 16384)")
    p.add_argument("--block-size", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.0,
                   help="also report the fraction with |x1| <= threshold (any activation)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu" if not _cuda() else "cuda")
    p.add_argument("--output", "-o", help="write the results as JSON here")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=_run_sparsity)


def _run_sparsity(args) -> int:
    from .checkpoint import load_model, load_tokenizer, resolve_source
    from .data import load_text_dataset, pack_blocks
    from .errors import DataError
    from .metrics import measure_sparsity

    if args.threshold < 0 or args.threshold != args.threshold:
        raise DataError(f"--threshold must be >= 0, got {args.threshold}")
    if args.max_tokens <= 0:
        raise DataError(f"--max-tokens must be > 0, got {args.max_tokens}")
    source = resolve_source(args.model)
    tokenizer = load_tokenizer(source, trust_remote_code=args.trust_remote_code)
    blocks = pack_blocks(load_text_dataset(args.data, split=args.split, text_column=args.text_column),
                         tokenizer, args.block_size)
    if len(blocks) == 0:
        raise DataError(f"data '{args.data}' is shorter than one block of {args.block_size} tokens; "
                        "add text or lower --block-size")
    model = load_model(source, dtype=args.dtype, trust_remote_code=args.trust_remote_code).to(args.device)
    result = measure_sparsity(model, blocks, threshold=args.threshold, batch_size=args.batch_size,
                              max_tokens=args.max_tokens)
    result = {"model": str(source), "activation": _activation_of(model), **result}
    if args.output:
        _write_json(Path(args.output), result)
    line = (f"{source}: activation {result['activation']}, zero-ratio {result['overall']:.2%} "
            f"over {result['tokens']} tokens, perplexity {result['perplexity']:.2f}")
    if args.threshold > 0:
        line += f", |x1| <= {args.threshold}: {result['overall_below_threshold']:.2%}"
    print(line)
    return 0


def _activation_of(model) -> str:
    from .architectures import architecture_for

    return str(getattr(model.config, architecture_for(model.config.model_type).activation_key))


def _write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


COMMANDS = [_add_convert, _add_sparsity]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relufy", description=__doc__.split(":")[0] if __doc__ else None)
    parser.description = "Turn Swish/GELU LLMs into sparse ReLU LLMs: convert, train (ProSparse), evaluate, publish."
    parser.add_argument("--version", action="version", version=f"relufy {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except RelufyError as exc:
        print(f"relufy {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"relufy {args.command}: interrupted", file=sys.stderr)
        return 130
