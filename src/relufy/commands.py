"""relufy's commands: each one's options dataclass (`relufy.options`), the arguments naming what it reads and
writes, and its run, which calls one module's function and prints one summary.

`relufy.cli` builds the parser from `COMMANDS` and reports errors; nothing here parses. A run gets
the parsed arguments (its inputs and outputs) and its checked config. Importing this module imports
no torch: each run imports what it needs.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from . import options
from .errors import DataError

MODEL = (("model",), {"help": "checkpoint directory, .gguf file or hub id"})
FORCE = (("--force",), {"action": "store_true", "help": "replace the output if relufy wrote it"})


def output(required: bool, help: str) -> tuple:
    return ("--output", "-o"), {"required": required, "help": help}


MARKDOWN = (("--markdown",), {"help": "also write the table to this markdown file"})


@dataclass(frozen=True)
class Command:
    """One subcommand: its help, its options dataclass, its run (called with the parsed arguments and the checked
    config), and the arguments naming its inputs and outputs."""

    name: str
    help: str
    description: str
    config: type
    run: Callable[[Namespace, object], int]
    arguments: tuple = ()


def claimed(path: str | None, args: Namespace, *, inputs: list):
    """A single-file output of this command (`path`, if given) locked and checked for the whole command: never one
    of its inputs, and replaced only with --force when relufy wrote it (`relufy.atomic.claim_output`, the one
    output rule)."""
    from .atomic import claim_output

    if not path:
        return nullcontext()
    return claim_output(path, command=f"relufy {args.command}", force=getattr(args, "force", False),
                        inputs=inputs, kind="file")


def write_signed(path: str | None, content, args: Namespace) -> None:
    """A JSON result or a markdown table, written atomically and signed as relufy's (nothing if `path` is None)."""
    if path:
        from .atomic import signed, write_text_atomically

        write_text_atomically(Path(path), signed(content, f"relufy {args.command}", what=str(path)))


def run_convert(args: Namespace, config: options.ConvertConfig) -> int:
    from .convert import convert_checkpoint

    activation = config.resolved()
    thresholds = None
    if config.layer_thresholds is not None:
        activation, thresholds = _layer_thresholds(args.src, config)
    out = convert_checkpoint(args.src, args.out, activation, force=args.force, link=config.link, dtype=config.dtype,
                             layer_thresholds=thresholds)
    print(f"wrote {out} (activation: {activation.config_value}"
          f"{'' if thresholds is None else f', thresholds {min(thresholds):g} to {max(thresholds):g} by layer'})")
    return 0


def _layer_thresholds(src: str, config: options.ConvertConfig):
    """(activation, per-layer thresholds) of `relufy convert --layer-thresholds`: one threshold for every layer is
    the plain `fatrelu_<t>` (it needs no list), anything else the bare `fatrelu` with the list."""
    from .activations import Activation
    from .architectures import architecture_of
    from .checkpoint import model_identity, read_config, resolve_source
    from .per_layer import PER_LAYER, thresholds_from_matched

    source = resolve_source(src)
    source_config = read_config(source)
    identity = model_identity(source, str(architecture_of(source_config).activation_of(source_config)))
    thresholds = thresholds_from_matched(config.layer_thresholds, config.matched_target, source_config, identity)
    if len(set(thresholds)) == 1:
        return Activation("fatrelu", thresholds[0]), None
    return PER_LAYER, thresholds


def run_sparsity(args: Namespace, config: options.SparsityConfig) -> int:
    with claimed(args.output, args, inputs=[args.model, config.data]):
        return _sparsity(args, config)


def _sparsity(args: Namespace, config: options.SparsityConfig) -> int:
    from .checkpoint import load_model, load_tokenizer, read_config, resolve_source
    from .checks import block_fits_context, finite_results
    from .data import load_text_dataset, pack_blocks
    from .architectures import activation_name
    from .metrics import measure_sparsity

    source = resolve_source(args.model)
    block_fits_context("--block-size", config.block_size, read_config(source), source)
    tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    blocks = pack_blocks(load_text_dataset(config.data, split=config.split, text_column=config.text_column),
                         tokenizer, config.block_size)
    if len(blocks) == 0:
        raise DataError(f"data '{config.data}' is shorter than one block of {config.block_size} tokens; "
                        "add text or lower --block-size")
    model = load_model(source, dtype=config.dtype, trust_remote_code=config.trust_remote_code).to(config.device)
    result = measure_sparsity(model, blocks, threshold=config.threshold, batch_size=config.batch_size,
                              max_tokens=config.max_tokens)
    result = {"model": str(source), "activation": activation_name(model), **result}
    finite_results(result, f"the sparsity run of {source}")
    write_signed(args.output, result, args)
    line = (f"{source}: activation {result['activation']}, zero-ratio {result['overall']:.2%} "
            f"over {result['tokens']} tokens, perplexity {result['perplexity']:.2f}")
    if config.threshold > 0:
        line += f", |x1| <= {config.threshold}: {result['overall_below_threshold']:.2%}"
    print(line)
    return 0


def run_train(args: Namespace, config: options.TrainConfig) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, config.overrides)  # a missing or broken recipe fails before torch loads
    from .train import train

    result = train(recipe, resume=config.resume, force=args.force, allow_changes=config.allow_changes)
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


def run_evaluate(args: Namespace, config: options.EvalConfig) -> int:
    from .evaluate import evaluate_model

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


def run_compare(args: Namespace, config: options.CompareConfig) -> int:
    with claimed(args.markdown, args, inputs=args.results):
        from .report import comparison_table, load_result

        results = [load_result(path) for path in args.results]
        names = config.names or [_result_name(Path(path)) for path in args.results]
        if len(names) != len(results):
            raise DataError(f"--names has {len(names)} names for {len(results)} results; give one per result")
        table = comparison_table(results, names)
        write_signed(args.markdown, table, args)
        print(table)
        return 0


def _result_name(path: Path) -> str:
    """An evaluation by its directory's name, a sparsity JSON by its file name."""
    if path.is_dir() or path.name == "results.json":
        return (path if path.is_dir() else path.parent).name
    return path.stem


def run_publish(args: Namespace, config: options.PublishConfig) -> int:
    from .publish import publish, push_folder

    out = publish(args.model_dir, config.results, args.out, repo_id=config.repo_id, base_model=config.base_model,
                  license_id=config.license, speed=config.speed, force=args.force)
    print(f"wrote {out}")
    if config.push:
        url = push_folder(out, config.repo_id, private=config.private)
        print(f"pushed {out} to {url}")
    return 0


def run_speed(args: Namespace, config: options.SpeedConfig) -> int:
    with claimed(args.output, args, inputs=[args.model]):
        from .report import speed_table
        from .speed import speed_of_checkpoint

        result = speed_of_checkpoint(args.model, config, trust_remote_code=args.trust_remote_code)
        write_signed(args.output, result, args)
        print(speed_table(result))
        print(f"wrote {args.output}")
        return 0


def run_matched(args: Namespace, config: options.MatchedConfig) -> int:
    with claimed(args.markdown, args, inputs=[args.model, config.heldout, config.calibration]):
        from .matched import matched_sparsity, matched_table

        result = matched_sparsity(args.model, args.output, config, force=args.force)
        table = matched_table([result])
        write_signed(args.markdown, table, args)
        print(table)
        print(f"wrote {args.output}")
        return 0


COMMANDS = [
    Command("convert", "swap the FFN activation of a checkpoint for ReLU (or a variant)",
            "Write a copy of SRC (directory, .gguf file or hub id) to OUT with a ReLU-family FFN activation. SRC is "
            "never modified.", options.ConvertConfig, run_convert,
            ((("src",), {"help": "checkpoint directory, .gguf file, or hub id (org/name)"}),
             (("out",), {"help": "output directory (must not exist unless --force)"}),
             (("--force",), {"action": "store_true",
                             "help": "replace OUT; convert even if SRC already uses the activation"}))),
    Command("sparsity", "measure the activation sparsity of x1 (FFN down-projection input)",
            "Run MODEL over text and report the fraction of exact zeros in the FFN intermediate activation, per "
            "layer and overall, plus perplexity.", options.SparsityConfig, run_sparsity,
            (MODEL, output(False, "write the results as JSON here"), FORCE)),
    Command("train", "ProSparse continual training: L1-regularized, sine-scheduled stages",
            "Train a (converted) ReLU model with the recipe's stages of L1 regularization on x1. Runs on one "
            "process, or distributed under `accelerate launch -m relufy train`. Its options are the recipe's "
            "keys (docs/training.md).", options.TrainConfig, run_train,
            ((("recipe",), {"help": "recipe YAML (see recipes/ and docs/training.md)"}),
             (("--force",), {"action": "store_true", "help": "start over in an output_dir that holds checkpoints "
                                                             "(they are deleted)"}))),
    Command("evaluate", "lm-eval accuracy + x1 sparsity per task + PPL-p%% sparsity",
            "Run lm-eval tasks in-process on MODEL (loaded once) while the probe records the zero-ratio of x1 per "
            "task and layer, then measure PPL-p% sparsity on held-out text. Writes OUTPUT/results.json, report.md "
            "and PNG plots. Without --tasks or --suite it runs relufy's offline suite (evaluate/tasks).",
            options.EvalConfig, run_evaluate,
            (MODEL, output(True, "directory for results.json, report.md, plots"), FORCE)),
    Command("matched", "threshold x1 to a target zero-ratio per layer (or one for all), then perplexity + lm-eval",
            "Calibrate a magnitude threshold per layer on held-out text so that each layer's x1 (the "
            "down-projection input) is a TARGET fraction zeros, zero |x1| <= threshold during the forward, and "
            "report held-out perplexity, the achieved zero-ratio and the lm-eval suite at that sparsity: models "
            "trained differently, compared at the same sparsity. FATReLU-style on a ReLU model, TEAL/CATS-style "
            "on a SiLU one.", options.MatchedConfig, run_matched,
            (MODEL, output(True, "results JSON to write (must not exist unless --force)"), MARKDOWN, FORCE,
             (("--no-suite",), {"dest": "run_suite", "action": "store_false",
                                "help": "perplexity and zero-ratio only, no lm-eval"}))),
    Command("compare", "side-by-side table of evaluation or sparsity results",
            "Print several `relufy evaluate` output directories side by side (accuracy per task and group, "
            "sparsity, PPL-p% sparsity), or several `relufy sparsity` JSONs (activation, zero-ratio, perplexity, "
            "tokens).", options.CompareConfig, run_compare,
            ((("results",), {"nargs": "+", "help": "evaluation directories (or their results.json), or sparsity "
                                                   "JSONs"}), MARKDOWN, FORCE)),
    Command("publish", "checkpoint folder + model card (+ Hub upload)",
            "Write PUBLISH_DIR with MODEL_DIR's safetensors and tokenizer and a model card built from an "
            "evaluation's results.json (its decode speed from a `relufy speed` JSON with --speed); --push uploads "
            "it with huggingface_hub (token from HF_TOKEN or the login cache).", options.PublishConfig, run_publish,
            ((("model_dir",), {"help": "the trained/converted checkpoint directory"}),
             (("--out",), {"required": True, "help": "PUBLISH_DIR to create"}), FORCE)),
    Command("speed", "decode tokens/s dense vs sparse in a CUDA-graph decode loop, + HF generate",
            "Load MODEL, sparsify its FFNs, and measure greedy decode tokens/s with the sparse FFNs off and on, in "
            "one process and one loop: a static KV cache and one decode step captured as a CUDA graph (eager on a "
            "CPU). Also reports the weights-bandwidth limit, HF generate's tokens/s, each FFN timed alone and the "
            "zero-ratio of x1 during decode.", options.SpeedConfig, run_speed,
            (MODEL, output(True, "write the results as JSON here"), FORCE,
             (("--trust-remote-code",), {"action": "store_true", "help": "run the checkpoint's own modeling code"}))),
]
