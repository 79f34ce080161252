"""`relufy evaluate`: lm-eval accuracy with the sparsity reached on each task, plus PPL-p% sparsity.

The model is loaded once; `harness.run_suite` runs the plan's lm-eval tasks (`suites`) one at a
time with the probe counting the zeros of x1 on real tokens, then `cett.ppl_p_sparsity` measures
PPL-p% sparsity on held-out text. Writes DIR/results.json, DIR/report.md and PNG plots
(atomically: temp dir, then rename).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from . import __version__
from .architectures import activation_name
from .atomic import atomic_directory, claim_output
from .cett import SearchSettings, ppl_p_sparsity
from .checks import block_fits_context, json_text
from .data import heldout_blocks
from .errors import RelufyError
from .harness import SuiteRun, run_suite
from .options import EvalConfig
from .report import evaluation_report, plot_per_layer_sparsity, plot_sparsity_vs_p
from .scores import group_averages, group_stderrs
from .suites import DEFAULT_HELDOUT, EvalPlan, task_manager

logger = logging.getLogger(__name__)

def evaluate_model(model_src: str, output: str | Path, config: EvalConfig, *, force: bool = False) -> dict:
    """Run lm-eval + probe + PPL-p% on one model and write results.json, report.md and plots to `output`.

    With `config.log_samples` it also writes lm-eval's per-example records to samples_<task>.jsonl;
    with `config.speed`, a short dense-vs-sparse decode measurement (`relufy speed`'s) when the model
    runs on CUDA.
    """
    from .checkpoint import resolve_source

    source = resolve_source(model_src)
    inputs = [source.on_disk, config.heldout, *config.include_path]
    with claim_output(output, command="relufy evaluate", force=force, inputs=inputs) as output:
        results, samples = _measure(source, config)
        _write_outputs(output, results, samples, force=force)
    return results


def _measure(source, config: EvalConfig) -> tuple[dict, dict[str, list]]:
    """The model loaded once and measured: lm-eval suite with the probe, PPL-p%, decode speed on CUDA."""
    from .checkpoint import load_model, load_tokenizer, read_config

    plan = config.plan()
    manager = task_manager(list(plan.tasks), config.include_path)
    tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    blocks = None
    if config.ps:
        block_fits_context("--block-size", config.block_size, read_config(source), source)
        blocks = heldout_blocks(config.heldout, tokenizer, block_size=config.block_size,
                                max_tokens=config.heldout_tokens)
    model = load_model(source, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    model = model.to(config.device).eval()

    suite = run_suite(model, tokenizer, plan, manager, config)
    ppl = {"results": {}, "forward_passes": 0, "tokens": 0}
    if config.ps:
        ppl = ppl_p_sparsity(model, blocks.to(config.device), ps=config.ps,
                             settings=SearchSettings(batch_size=config.batch_size, progress=True))
    results = _results(source, model, plan, suite, ppl, config)
    if config.speed and torch.device(config.device).type == "cuda":
        measured = _decode_speed(model)
        if measured is not None:
            results["speed"] = measured
    return results, suite.samples


def _results(source, model, plan: EvalPlan, suite: SuiteRun, ppl: dict, config: EvalConfig) -> dict:
    """results.json's content. Names, not local paths: results and the cards made from them are meant for sharing."""
    from .checkpoint import model_identity, model_name

    return {
        "model": model_name(source),
        "model_name": model_name(source),
        "activation": activation_name(model),
        "identity": model_identity(source, activation_name(model)),
        "relufy_version": __version__,
        "lm_eval": suite.harness,
        "scores": group_averages(suite.harness, plan.groups),
        "scores_stderr": group_stderrs(suite.harness, plan.groups),
        "sparsity": suite.sparsity(),
        "ppl_p_sparsity": ppl["results"],
        "ppl_p_forward_passes": ppl["forward_passes"],
        "heldout": {"source": _data_name(config.heldout), "tokens": ppl["tokens"], "block_size": config.block_size},
        "tokens_evaluated": suite.tokens + ppl["tokens"],
        "settings": {"tasks": plan.tasks, "groups": plan.groups, "limit": config.limit,
                     "batch_size": config.batch_size, "dtype": config.dtype, "device": config.device},
    }


def _decode_speed(model) -> dict | None:
    """`relufy speed` with small settings and no torch.compile: a quick look (`relufy speed` is the full
    measurement). It runs last: `sparsify` hands the FFNs to the sparse kernels, and lm-eval and PPL-p%
    have measured the model as loaded. A model the decode loop cannot drive (another attention
    implementation, say) leaves the section out with a warning rather than failing the evaluation."""
    from .sparse import sparsify
    from .speed import SpeedConfig, measure_speed

    device = next(model.parameters()).device
    config = SpeedConfig(batch_sizes=(1,), prompt_tokens=32, new_tokens=64, generate_tokens=32, compile=False,
                         dtype=str(next(model.parameters()).dtype).removeprefix("torch."), device=str(device))
    try:
        return measure_speed(sparsify(model), config)
    except RelufyError as exc:
        logger.warning("decode speed not measured: %s", exc)
        return None


def _write_outputs(output: Path, results: dict, samples: dict[str, list], *, force: bool) -> None:
    """results.json, report.md, plots and samples_<task>.jsonl into a temp sibling, renamed over `output` at the end."""
    with atomic_directory(output, replace=force, command="relufy evaluate") as tmp:
        (tmp / "results.json").write_text(json_text(results, f"{output}/results.json"))
        for task, records in samples.items():
            (tmp / f"samples_{task}.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
        plots = {"per_layer": "sparsity_per_layer.png", "vs_p": "sparsity_vs_p.png"}
        plot_per_layer_sparsity(results, tmp / plots["per_layer"])
        plot_sparsity_vs_p(results, tmp / plots["vs_p"])
        (tmp / "report.md").write_text(evaluation_report(results, plots) + "\n")


def _data_name(spec: str | Path) -> str:
    """relufy's own held-out file by its place in the project, a local file by its name, a datasets name as is."""
    path = Path(spec)
    if path.resolve() == DEFAULT_HELDOUT.resolve():
        return "evaluate/tasks/data/heldout.jsonl"
    return path.name if path.exists() else str(spec)


