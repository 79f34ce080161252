"""The `relufy` command: argument parsing and error reporting only; each subcommand calls one module."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import DataError, RelufyError, is_disk_full

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
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available, else cpu)")
    p.add_argument("--output", "-o", help="write the results as JSON here")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if relufy wrote it")
    p.set_defaults(run=_run_sparsity)


def _run_sparsity(args) -> int:
    device = _check_sparsity_args(args)  # before the claim: a refused option leaves no lock file behind
    with _claimed(args.output, args, inputs=[args.model, args.data]):
        return _sparsity(args, device)


def _sparsity(args, device: str) -> int:
    from .checkpoint import load_model, load_tokenizer, read_config, resolve_source
    from .checks import block_fits_context, finite_results
    from .data import load_text_dataset, pack_blocks
    from .evaluate import activation_name
    from .metrics import measure_sparsity

    source = resolve_source(args.model)
    block_fits_context("--block-size", args.block_size, read_config(source), source)
    tokenizer = load_tokenizer(source, trust_remote_code=args.trust_remote_code)
    blocks = pack_blocks(load_text_dataset(args.data, split=args.split, text_column=args.text_column),
                         tokenizer, args.block_size)
    if len(blocks) == 0:
        raise DataError(f"data '{args.data}' is shorter than one block of {args.block_size} tokens; "
                        "add text or lower --block-size")
    model = load_model(source, dtype=args.dtype, trust_remote_code=args.trust_remote_code).to(device)
    result = measure_sparsity(model, blocks, threshold=args.threshold, batch_size=args.batch_size,
                              max_tokens=args.max_tokens)
    result = {"model": str(source), "activation": activation_name(model), **result}
    finite_results(result, f"the sparsity run of {source}")
    if args.output:
        _write_json(Path(args.output), result, args)
    line = (f"{source}: activation {result['activation']}, zero-ratio {result['overall']:.2%} "
            f"over {result['tokens']} tokens, perplexity {result['perplexity']:.2f}")
    if args.threshold > 0:
        line += f", |x1| <= {args.threshold}: {result['overall_below_threshold']:.2%}"
    print(line)
    return 0


def _claimed(path: str | None, args, *, inputs: list):
    """A single-file output of this command (`path`, if given) locked and checked for the whole command: never one
    of its inputs, and replaced only with --force when relufy wrote it (relufy.atomic.check_output)."""
    from contextlib import nullcontext

    from .atomic import claim_output

    if not path:
        return nullcontext()
    return claim_output(path, command=f"relufy {args.command}", force=getattr(args, "force", False),
                        inputs=inputs, kind="file")


def _check_sparsity_args(args) -> str:
    """Every option of `relufy sparsity`, before anything loads; returns the device."""
    from .checks import BATCH_LIMIT, int_in_range, number_in_range, positive_int, supported_dtype

    number_in_range("--threshold", args.threshold, 0, math.inf, high_open=True)
    positive_int("--max-tokens", args.max_tokens)
    int_in_range("--block-size", args.block_size, 2, 1 << 24)
    positive_int("--batch-size", args.batch_size, BATCH_LIMIT)
    supported_dtype("--dtype", args.dtype)
    return _device(args)


def _write_json(path: Path, payload: dict, args) -> None:
    from .atomic import signed, write_text_atomically

    write_text_atomically(path, signed(payload, f"relufy {args.command}", what=str(path)))


def _comma_list(text: str, convert=str, flag: str = "", what: str = "") -> list:
    """The items of a comma-separated option, blanks skipped; an item `convert` rejects is a one-line error."""
    try:
        return [convert(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise DataError(f"{flag} must be {what}, got '{text}'") from None


def _write_markdown(path: str | None, table: str, args) -> None:
    """`--markdown PATH`: the printed table, also written to a file (atomically, signed as relufy's)."""
    if path:
        from .atomic import signed, write_text_atomically

        write_text_atomically(Path(path), signed(table, f"relufy {args.command}"))


def _device(args) -> str:
    """--device (checked: cuda needs a visible CUDA device), or the default resolved only now: asking torch
    while building the parser would make every command (even --help) pay for importing torch."""
    if args.device:
        from .checks import device_available

        return device_available(args.device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="ProSparse continual training: L1-regularized, sine-scheduled stages",
                       description="Train a (converted) ReLU model with the recipe's stages of L1 regularization on "
                                   "x1. Runs on one process, or distributed under `accelerate launch -m relufy train`.")
    p.add_argument("recipe", help="recipe YAML (see recipes/ and docs/training.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, dotted for nesting: --set max_steps=100 --set stages.1.lambda=0.01")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in "
                                                         "output_dir; refused if the recipe changed since")
    p.add_argument("--allow-changes", action="store_true", help="with --resume: continue even though training "
                                                                "keys of the recipe changed (each is logged)")
    p.add_argument("--force", action="store_true", help="start over in an output_dir that holds checkpoints "
                                                        "(they are deleted)")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # a missing or broken recipe fails before torch loads
    from .train import train

    result = train(recipe, resume=args.resume, force=args.force, allow_changes=args.allow_changes)
    if recipe.training.process_index != 0:
        return 0
    if result.stopped_for_time:
        print(f"stopped at step {result.steps} of {result.max_steps} after max_train_minutes="
              f"{recipe.training.max_train_minutes:g}; saved {result.checkpoint}. Continue with: relufy train "
              f"{args.recipe} --resume (and the same --set overrides)")
        return 0
    line = f"wrote {result.output_dir} after {result.steps} steps"
    if result.activation_sparsity is not None:
        line += f", x1 zero-ratio {result.activation_sparsity:.2%} at lambda {result.l1_lambda:g}"
    if shift := result.threshold_shift:
        line += (f"; FATReLU threshold {shift['threshold']:g} (perplexity {shift['perplexity_before']:.2f} -> "
                 f"{shift['perplexity_after']:.2f}, zero-ratio {shift['sparsity_after']:.2%})")
    print(line)
    if note := toy_run_note(recipe):
        print(note)
    return 0


def toy_run_note(recipe) -> str | None:
    """A recipe that cuts the model's layers (tiny-cpu keeps 2 of 30) trains a toy: say that its perplexity is
    expected to be useless, so a huge number is not mistaken for a failure."""
    layers = recipe.model.model_config_overrides.get("num_hidden_layers")
    if layers is None:
        return None
    return (f"note: model_config_overrides keeps only {layers} decoder layer(s), so this is a toy run that shows "
            "the mechanics; its perplexity is expected to be huge and its weights useless as a model")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="lm-eval accuracy + x1 sparsity per task + PPL-p%% sparsity",
                       description="Run lm-eval tasks in-process on MODEL (loaded once) while the probe records the "
                                   "zero-ratio of x1 per task and layer, then measure PPL-p% sparsity on held-out "
                                   "text. Writes OUTPUT/results.json, report.md and PNG plots. Without --tasks or "
                                   "--suite it runs relufy's offline suite (evaluate/tasks).")
    p.add_argument("model", help="checkpoint directory, .gguf file or hub id")
    p.add_argument("--output", "-o", required=True, help="directory for results.json, report.md, plots")
    p.add_argument("--tasks", help="comma-separated lm-eval task or group names (e.g. piqa,hellaswag,relufy_offline)")
    p.add_argument("--suite", choices=["prosparse", "offline"],
                   help="preset: 'prosparse' = the ProSparse paper's benchmark groups (needs network for data); "
                        "'offline' = relufy's own tasks")
    p.add_argument("--num-fewshot", type=int, help="override every task's few-shot count")
    p.add_argument("--limit", type=float, help="examples per task (int) or fraction (<1): a quick slice")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int, help="context length for lm-eval (default: the model's)")
    p.add_argument("--p", dest="ps", default="1,5,10", help="PPL-p%% values, comma-separated (default 1,5,10); 'none' skips PPL-p%%")
    p.add_argument("--heldout", help="held-out text for PPL-p%% (.txt/.jsonl/folder/datasets name; "
                                     "default: evaluate/tasks/data/heldout.jsonl)")
    p.add_argument("--heldout-tokens", type=int, default=2048, help="held-out tokens for PPL-p%% (default 2048)")
    p.add_argument("--block-size", type=int, default=256, help="tokens per held-out block (default 256)")
    p.add_argument("--include-path", action="append", default=[], help="extra lm-eval task folder")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow tasks that execute model-written code (HumanEval, MBPP)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available, else cpu)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--log-samples", action="store_true",
                   help="also write lm-eval's per-example records (inputs, answers, scores) to OUTPUT/samples_TASK.jsonl")
    p.add_argument("--no-speed", action="store_true",
                   help="skip the short dense-vs-sparse decode speed measurement (run on CUDA only)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from .evaluate import DEFAULT_HELDOUT, EvalConfig, evaluate_model

    ps = [] if args.ps == "none" else _comma_list(args.ps, float, "--p", "comma-separated numbers like 1,5,10")
    config = EvalConfig(tasks=_comma_list(args.tasks) if args.tasks else None, suite=args.suite,
                        num_fewshot=args.num_fewshot, include_path=[Path(p) for p in args.include_path],
                        limit=args.limit, batch_size=args.batch_size, max_length=args.max_length,
                        confirm_run_unsafe_code=args.confirm_run_unsafe_code, log_samples=args.log_samples,
                        ps=ps, heldout=args.heldout or DEFAULT_HELDOUT, heldout_tokens=args.heldout_tokens,
                        block_size=args.block_size, device=_device(args), dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code, speed=not args.no_speed)
    result = evaluate_model(args.model, args.output, config, force=args.force)
    ppl = ", ".join(f"PPL-{p}% {e['sparsity']:.2%}" for p, e in result["ppl_p_sparsity"].items())
    print(f"wrote {args.output}: zero-ratio {result['sparsity']['overall']:.2%} over "
          f"{result['sparsity']['tokens']} lm-eval tokens; {ppl} "
          f"({result['ppl_p_forward_passes']} forward passes)")
    if "speed" in result:
        row = result["speed"]["decode"][0]
        if row["speedup"] is None:
            print(result["speed"]["note"])
        else:
            print(f"decode at batch {row['batch_size']}: dense {row['dense_tokens_per_s']:.1f} tok/s, sparse "
                  f"{row['sparse_tokens_per_s']:.1f} tok/s ({row['speedup']:.2f}x)")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="side-by-side table of evaluation or sparsity results",
                       description="Print several `relufy evaluate` output directories side by side (accuracy per "
                                   "task and group, sparsity, PPL-p%% sparsity), or several `relufy sparsity` "
                                   "JSONs (activation, zero-ratio, perplexity, tokens).")
    p.add_argument("results", nargs="+", help="evaluation directories (or their results.json), or sparsity JSONs")
    p.add_argument("--names", help="comma-separated column names (default: each directory's or JSON file's name)")
    p.add_argument("--markdown", help="also write the table to this markdown file")
    p.add_argument("--force", action="store_true", help="replace the --markdown file if relufy wrote it")
    p.set_defaults(run=_run_compare)


def _run_compare(args) -> int:
    with _claimed(args.markdown, args, inputs=args.results):
        return _compare(args)


def _compare(args) -> int:
    from .report import comparison_table, load_result

    results = [load_result(path) for path in args.results]
    names = [_result_name(Path(path)) for path in args.results]
    if args.names:
        names = [name.strip() for name in args.names.split(",")]
        if len(names) != len(results):
            raise DataError(f"--names has {len(names)} names for {len(results)} results; give one per result")
    table = comparison_table(results, names)
    _write_markdown(args.markdown, table, args)
    print(table)
    return 0


def _result_name(path: Path) -> str:
    """An evaluation by its directory's name, a sparsity JSON by its file name."""
    if path.is_dir() or path.name == "results.json":
        return (path if path.is_dir() else path.parent).name
    return path.stem


def _add_publish(sub) -> None:
    p = sub.add_parser("publish", help="checkpoint folder + model card (+ Hub upload)",
                       description="Write PUBLISH_DIR with MODEL_DIR's safetensors and tokenizer and a model card "
                                   "built from an evaluation's results.json; --push uploads it with huggingface_hub "
                                   "(token from HF_TOKEN or the login cache).")
    p.add_argument("model_dir", help="the trained/converted checkpoint directory")
    p.add_argument("--results", required=True, help="results.json written by `relufy evaluate` for this model")
    p.add_argument("--out", required=True, help="PUBLISH_DIR to create")
    p.add_argument("--repo-id", help="Hub repository id (org/name) for the card and --push")
    p.add_argument("--base-model", help="hub id of the original model (default: read from the checkpoint)")
    p.add_argument("--license", help="license id (default: carried over from the source model)")
    p.add_argument("--push", action="store_true", help="upload PUBLISH_DIR to --repo-id")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.add_argument("--force", action="store_true", help="replace PUBLISH_DIR if it exists")
    p.set_defaults(run=_run_publish)


def _run_publish(args) -> int:
    from .publish import publish, push_folder

    out = publish(args.model_dir, args.results, args.out, repo_id=args.repo_id, base_model=args.base_model,
                  license_id=args.license, force=args.force)
    print(f"wrote {out}")
    if args.push:
        url = push_folder(out, args.repo_id, private=args.private)
        print(f"pushed {out} to {url}")
    return 0


def _add_speed(sub) -> None:
    p = sub.add_parser("speed", help="decode tokens/s dense vs sparse in a CUDA-graph decode loop, + HF generate",
                       description="Load MODEL, sparsify its FFNs, and measure greedy decode tokens/s with the "
                                   "sparse FFNs off and on, in one process and one loop: a static KV cache and one "
                                   "decode step captured as a CUDA graph (eager on a CPU). Also reports the "
                                   "weights-bandwidth limit, HF generate's tokens/s, each FFN timed alone and the "
                                   "zero-ratio of x1 during decode.")
    p.add_argument("model", help="checkpoint directory, .gguf file or hub id")
    p.add_argument("--output", "-o", required=True, help="write the results as JSON here")
    p.add_argument("--batch-sizes", default="1,4,16", help="comma-separated decode batch sizes (default 1,4,16)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="random prompt tokens per sequence (default 128)")
    p.add_argument("--new-tokens", type=int, default=256, help="decode steps timed per run (default 256)")
    p.add_argument("--generate-tokens", type=int, default=128, help="new tokens of the HF generate run (default 128)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"])
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--no-compile", action="store_true",
                   help="capture the plain eager decode step (by default, on CUDA, it is compiled first, "
                        "as gpt-fast does)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(run=_run_speed)


def _run_speed(args) -> int:
    from .speed import SpeedConfig

    batch_sizes = tuple(_comma_list(args.batch_sizes, int, "--batch-sizes", "comma-separated integers like 1,4,16"))
    config = SpeedConfig(batch_sizes=batch_sizes, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                         generate_tokens=args.generate_tokens, dtype=args.dtype, device=_device(args), seed=args.seed,
                         compile=not args.no_compile)
    config.check()  # before the claim: a refused option leaves no lock file behind
    with _claimed(args.output, args, inputs=[args.model]):
        return _speed(args, config)


def _speed(args, config) -> int:
    from .report import speed_table
    from .speed import speed_of_checkpoint

    output = Path(args.output)
    result = speed_of_checkpoint(args.model, config, trust_remote_code=args.trust_remote_code)
    _write_json(output, result, args)
    print(speed_table(result))
    print(f"wrote {output}")
    return 0


def _add_matched(sub) -> None:
    p = sub.add_parser("matched", help="threshold x1 to a target zero-ratio per layer, then perplexity + lm-eval",
                       description="Calibrate a magnitude threshold per layer on held-out text so that each layer's "
                                   "x1 (the down-projection input) is a TARGET fraction zeros, zero |x1| <= threshold "
                                   "during the forward, and report held-out perplexity, the achieved zero-ratio and "
                                   "the lm-eval suite at that sparsity: models trained differently, compared at the "
                                   "same sparsity. FATReLU-style on a ReLU model, TEAL/CATS-style on a SiLU one.")
    p.add_argument("model", help="checkpoint directory, .gguf file or hub id")
    p.add_argument("--target", "-t", action="append", required=True, metavar="ZERO_RATIO",
                   help="zero-ratio of x1 to reach in every layer, in (0, 1); repeat it or separate by commas "
                        "(--target 0.869 --target 0.9)")
    p.add_argument("--output", "-o", required=True, help="results JSON to write (must not exist unless --force)")
    p.add_argument("--markdown", help="also write the table to this markdown file")
    p.add_argument("--heldout", help="perplexity text (default: evaluate/tasks/data/heldout.jsonl); also the "
                                     "calibration text, on separate blocks, unless --calibration is given")
    p.add_argument("--heldout-tokens", type=int, default=16384, help="perplexity tokens (default 16384)")
    p.add_argument("--calibration", help="text to calibrate the thresholds on (default: the held-out text's blocks "
                                         "after the perplexity ones)")
    p.add_argument("--calibration-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--block-size", type=int, default=512, help="tokens per block (default 512)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (default: relufy's offline suite)")
    p.add_argument("--suite", choices=["prosparse", "offline"], help="a preset suite, as for `relufy evaluate`")
    p.add_argument("--no-suite", action="store_true", help="perplexity and zero-ratio only, no lm-eval")
    p.add_argument("--limit", type=float, help="examples per lm-eval task (int) or fraction (<1)")
    p.add_argument("--max-length", type=int, help="context length for lm-eval (default: the model's)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available, else cpu)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(run=_run_matched)


def _run_matched(args) -> int:
    with _claimed(args.markdown, args, inputs=[args.model, args.heldout, args.calibration]):
        return _matched(args)


def _matched(args) -> int:
    from .evaluate import DEFAULT_HELDOUT
    from .matched import MatchedConfig, matched_sparsity, matched_table

    targets = tuple(_comma_list(",".join(args.target), float, "--target", "zero-ratios like 0.9 or 0.869,0.9"))
    tasks = _comma_list(args.tasks) if args.tasks else None
    config = MatchedConfig(targets=targets, heldout=args.heldout or str(DEFAULT_HELDOUT),
                           heldout_tokens=args.heldout_tokens, calibration=args.calibration,
                           calibration_tokens=args.calibration_tokens, block_size=args.block_size,
                           batch_size=args.batch_size, suite=args.suite, tasks=tasks, run_suite=not args.no_suite,
                           limit=args.limit, max_length=args.max_length, device=_device(args), dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code)
    result = matched_sparsity(args.model, args.output, config, force=args.force)
    table = matched_table([result])
    _write_markdown(args.markdown, table, args)
    print(table)
    print(f"wrote {args.output}")
    return 0


COMMANDS = [_add_convert, _add_sparsity, _add_train, _add_evaluate, _add_matched, _add_compare, _add_publish,
            _add_speed]


class _OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as relufy's other errors: one line naming the problem, and where help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="relufy", description=__doc__.split(":")[0] if __doc__ else None)
    parser.description = "Turn Swish/GELU LLMs into sparse ReLU LLMs: convert, train (ProSparse), evaluate, publish."
    parser.add_argument("--version", action="version", version=f"relufy {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _interrupt(signum, frame):
    """SIGTERM (a job scheduler, `kill`, `timeout`) stops relufy like Ctrl-C: temp folders are removed."""
    raise KeyboardInterrupt


class _QuietHarmless(logging.Filter):
    """DeepSpeed warns "Setting accelerator to CPU" whenever torch sees no GPU, even on a plain convert that
    only imported it through transformers: on such a machine it says nothing new."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


_QUIET_HARMLESS = _QuietHarmless()


def main(argv: list[str] | None = None) -> int:
    command = "relufy"
    logging.getLogger("DeepSpeed").addFilter(_QUIET_HARMLESS)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers may be set
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        args = build_parser().parse_args(argv)
        command = f"relufy {args.command}"
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return args.run(args)
    except RelufyError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file the user named cannot be read or written: no traceback
        if exc.errno not in _USER_FIXABLE:
            if is_disk_full(exc):
                return _disk_full(command, exc)
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{command}: error: {exc.strerror}{where}; check the path, its permissions and free space",
              file=sys.stderr)
        return 1
    except Exception as exc:  # safetensors' SafetensorError and torch's errors are no OSError, even on a full disk
        if not is_disk_full(exc):
            raise
        return _disk_full(command, exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _disk_full(command: str, exc: BaseException) -> int:
    """One line for a full disk or quota, whichever library noticed it (outputs are written atomically, so
    nothing half-written is left)."""
    print(f"{command}: error: no space left on the device (or the quota is used up) while writing "
          f"({type(exc).__name__}); free space or choose an output on another disk, then run it again",
          file=sys.stderr)
    return 1


_USER_FIXABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.EISDIR,
                 errno.ENOTDIR}
