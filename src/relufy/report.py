"""Tables and plots of measured results: sparsity JSONs, evaluation results.json, `relufy compare`,
and the training curves of a run's log history."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .atomic import atomic_file
from .errors import DataError
from .scores import SCORE_METRICS, score_stderr, suite_stderrs, task_scores

TRAINING_PLOT = "training_curves.png"  # beside the trained model in output_dir
PROFILE_NAME_WIDTH, PROFILE_ROWS = 64, 10  # kernel names cut to this width in a table; rows per kernel table


def load_result(path: str | Path) -> dict:
    """A results file: a sparsity JSON, or a directory holding results.json."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; pass a JSON written by 'relufy sparsity' or an evaluation directory") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg})") from None


def sparsity_table(results: list[dict], names: list[str]) -> str:
    """Markdown: one row per result with activation, zero-ratio, perplexity and tokens."""
    lines = ["| model | activation | zero-ratio | perplexity | tokens |", "| --- | --- | ---: | ---: | ---: |"]
    for name, result in zip(names, results):
        lines.append(f"| {name} | {result.get('activation', '?')} | {result['overall']:.2%} | "
                     f"{result.get('perplexity', float('nan')):.2f} | {result.get('tokens', 0)} |")
    return "\n".join(lines)


def comparison_table(results: list[dict], names: list[str]) -> str:
    """`relufy compare`: the sparsity table for `relufy sparsity` JSONs, the evaluation table for
    `relufy evaluate` results; the two kinds hold different measurements, so they are not mixed."""
    sparsity = [_is_sparsity_result(result) for result in results]
    if all(sparsity):
        return sparsity_table(results, names)
    if not any(sparsity):
        return compare_table(results, names)
    raise DataError("compare takes either 'relufy sparsity' JSONs or 'relufy evaluate' results, not both; "
                    "compare each kind on its own")


def _is_sparsity_result(result: dict) -> bool:
    return "overall" in result and "lm_eval" not in result


def with_stderr(value, error) -> str:
    """A score for a table: "48.04 ± 2.10", or the score alone where its error is not known; "-" for none."""
    return _fmt(value) if error is None or value is None else f"{_fmt(value)} ± {_fmt(error)}"


def _fmt(value, pattern: str = "{:.2f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def evaluation_report(result: dict, plots: dict[str, str] | None = None) -> str:
    """report.md for one evaluation: accuracy per task, group averages, sparsity per task, PPL-p%."""
    sparsity = result["sparsity"]
    lines = [f"# Evaluation of {result.get('model_name', result['model'])}", "",
             f"Model: `{result['model']}`; activation `{result.get('activation', '?')}`; relufy "
             f"{result.get('relufy_version', '?')}; {result.get('tokens_evaluated', 0)} tokens evaluated.", "",
             "## Accuracy and sparsity per task", "",
             "| task | metric | value (± standard error) | zero-ratio of x1 | tokens |",
             "| --- | --- | ---: | ---: | ---: |"]
    scores = task_scores(result["lm_eval"])
    for name, (metric, value) in scores.items():
        task_sparsity = sparsity["per_task"].get(name, {})
        shown = value * 100 if metric in SCORE_METRICS else value
        lines.append(f"| {name} | {metric} | {with_stderr(shown, score_stderr(result['lm_eval'], name))} | "
                     f"{_fmt(task_sparsity.get('overall'), '{:.2%}')} | {task_sparsity.get('tokens', '-')} |")
    lines.append(f"| **all tasks** | | | **{_fmt(sparsity['overall'], '{:.2%}')}** | {sparsity.get('tokens', '-')} |")
    if result.get("scores"):
        errors = suite_stderrs(result)
        lines += ["", "## Group averages (accuracy, %; ± standard error, tasks independent)", "",
                  "| group | score |", "| --- | ---: |"]
        lines += [f"| {group} | {with_stderr(value, errors.get(group))} |"
                  for group, value in result["scores"].items()]
    ppl = result.get("ppl_p_sparsity", {})
    if ppl:
        lines += ["", "## PPL-p% sparsity (Sparsing Law, arXiv 2411.02335)", "",
                  f"Held-out text: `{result.get('heldout', {}).get('source', '?')}`, "
                  f"{result.get('heldout', {}).get('tokens', '?')} tokens; "
                  f"{result.get('ppl_p_forward_passes', '?')} forward passes in all.", "",
                  "| p | sparsity | CETT | PPL | dense PPL | forward passes |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for p, entry in ppl.items():
            lines.append(f"| {p}% | {entry['sparsity']:.2%} | {entry['cett']:.4f} | {entry['ppl']:.3f} | "
                         f"{entry['ppl_dense']:.3f} | {entry.get('forward_passes', '-')} |")
        lines += ["", "Per-layer thresholds eps (neuron i is dropped when |x1_i| * ||W_down[:, i]|| <= eps):", "",
                  "| layer | " + " | ".join(f"p = {p}%" for p in ppl) + " |", "| ---: |" + " ---: |" * len(ppl)]
        layers = len(next(iter(ppl.values()))["thresholds"])
        for layer in range(layers):
            lines.append(f"| {layer} | " + " | ".join(f"{entry['thresholds'][layer]:.3g}" for entry in ppl.values()) + " |")
    if result.get("speed"):
        lines += ["", "## Decode speed (dense vs sparse FFNs, `relufy speed`)", "", speed_table(result["speed"])]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines)


def compare_table(results: list[dict], names: list[str]) -> str:
    """Markdown, one column per evaluation: accuracy per task and group, sparsity, PPL-p% sparsity."""
    for name, result in zip(names, results):
        if "lm_eval" not in result or "sparsity" not in result:
            raise DataError(f"{name} is not an evaluation results.json (run `relufy evaluate` first)")
    scores = [task_scores(result["lm_eval"]) for result in results]
    header = "| | " + " | ".join(names) + " |"
    lines = [header, "| --- |" + " ---: |" * len(names)]
    tasks = list(dict.fromkeys(task for score in scores for task in score))
    for task in tasks:
        metric = next(score[task][0] for score in scores if task in score)
        cells = []
        for score, result in zip(scores, results):
            value = score.get(task, (metric, None))[1]
            if value is not None and metric in SCORE_METRICS:
                cells.append(with_stderr(value * 100, score_stderr(result["lm_eval"], task)))
            else:
                cells.append(_fmt(value))
        lines.append(f"| {task} ({metric}) | " + " | ".join(cells) + " |")
    groups = list(dict.fromkeys(group for result in results for group in result.get("scores", {})))
    errors = [suite_stderrs(result) for result in results]
    for group in groups:
        lines.append(f"| group: {group} | " + " | ".join(
            with_stderr(r.get("scores", {}).get(group), e.get(group)) for r, e in zip(results, errors)) + " |")
    lines.append("| zero-ratio of x1 (all tasks) | " + " | ".join(
        _fmt(r["sparsity"]["overall"], "{:.2%}") for r in results) + " |")
    ps = list(dict.fromkeys(p for result in results for p in result.get("ppl_p_sparsity", {})))
    for p in ps:
        cells = [r.get("ppl_p_sparsity", {}).get(p) for r in results]
        lines.append(f"| PPL-{p}% sparsity | " + " | ".join(_fmt(c and c["sparsity"], "{:.2%}") for c in cells) + " |")
    lines.append("| dense held-out PPL | " + " | ".join(
        _fmt(next(iter(r.get("ppl_p_sparsity", {}).values()), {}).get("ppl_dense")) for r in results) + " |")
    return "\n".join(lines)


def plot_per_layer_sparsity(result: dict, path: Path) -> None:
    """PNG: zero-ratio of x1 per layer, all tasks together and per task."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    per_layer = result["sparsity"]["per_layer"]
    for name, entry in result["sparsity"]["per_task"].items():
        axes.plot(range(len(entry["per_layer"])), entry["per_layer"], alpha=0.5, linewidth=1, label=name)
    axes.plot(range(len(per_layer)), per_layer, color="black", linewidth=2, label="all tasks")
    axes.set(xlabel="layer", ylabel="zero-ratio of x1", ylim=(0, 1),
             title=f"{result.get('model_name', '')} ({result.get('activation', '')})")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_sparsity_vs_p(result: dict, path: Path) -> None:
    """PNG: PPL-p% sparsity against p, with the perplexity reached at each point."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 4))
    entries = sorted(((float(p), e) for p, e in result.get("ppl_p_sparsity", {}).items()), key=lambda pe: pe[0])
    xs, ys = [p for p, _ in entries], [e["sparsity"] for _, e in entries]
    axes.plot(xs, ys, marker="o")
    for x, (_, entry) in zip(xs, entries):
        axes.annotate(f"PPL {entry['ppl']:.2f}", (x, entry["sparsity"]), fontsize=7,
                      textcoords="offset points", xytext=(4, -10))
    axes.set(xlabel="p (% perplexity rise)", ylabel="PPL-p% sparsity", ylim=(0, 1),
             title=f"{result.get('model_name', '')} ({result.get('activation', '')})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_training_plot(history: list[dict], path: Path) -> Path | None:
    """PNG of l1_lambda, loss and activation_sparsity against step from a Trainer's log history (nothing if
    no step was logged); written beside and moved into place, so a failure leaves no half-written file."""
    rows = [entry for entry in history if "l1_lambda" in entry]
    if not rows:
        return None
    plt = _pyplot()
    steps = [entry["step"] for entry in rows]
    panels = [("l1_lambda", "lambda"), ("loss", "loss (LM + lambda * L1)"), ("activation_sparsity", "x1 zero-ratio")]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7, 7))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [entry.get(key, math.nan) for entry in rows], marker="." if len(rows) < 50 else None)
        if key == "loss":
            ax.plot(steps, [entry.get("lm_loss", math.nan) for entry in rows], label="LM loss")
            ax.legend()
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle("ProSparse training")
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


def speed_table(result: dict) -> str:
    """Markdown: decode tokens/s per batch size dense vs sparse, then generate, the bandwidth limit,
    the FFNs alone and the decode sparsity, one line each; then zeros and unions per layer."""
    lines = [result["note"], ""] if result.get("note") else []
    lines += ["| batch | dense tok/s | sparse tok/s | sparse/dense | tokens identical |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for row in result["decode"]:
        dense_route = " (both dense)" if row.get("ffn_route", "sparse kernels") != "sparse kernels" else ""
        lines.append(f"| {row['batch_size']} | {row['dense_tokens_per_s']:.1f} | {_number(row['sparse_tokens_per_s'])} | "
                     f"{_number(row['speedup'], '.2f', 'x')}{dense_route} | {_number(row['token_match'], '.2%')} |")
    divergences = [(row["batch_size"], entry) for row in result["decode"] for entry in row.get("first_divergences") or []]
    if divergences:
        widest = max(divergences, key=lambda pair: pair[1]["dense_margin"])
        lines += ["", f"Where sparse tokens first differ from dense ({len(divergences)} sequences): at decode step "
                  f"{min(entry['step'] for _, entry in divergences)} at the earliest; the dense model's logit margin "
                  f"for its own token there is at most {widest[1]['dense_margin']:.3g} (batch {widest[0]}, sequence "
                  f"{widest[1]['sequence']}, step {widest[1]['step']}): small margins are near-ties, large ones "
                  "mean the sparse step computed something else."]
    loop = "eager decode steps (no CUDA)"
    if result.get("cuda_graph"):
        mode = result["config"].get("compile_mode")
        compiled = f" (torch.compile{'' if mode in (None, 'default') else ', ' + mode})" if result.get("compiled") else ""
        loop = f"one decode step{compiled} captured as a CUDA graph"
    lines += ["", f"Decode loop: static KV cache, {loop}, greedy; {result['config']['prompt_tokens']} prompt tokens, "
              f"{result['config']['new_tokens']} new tokens; {result.get('gpu') or result.get('device')}, "
              f"{result.get('dtype')}; {result.get('sparse_ffns', 0)} of {result.get('ffns', '?')} FFNs sparse."]
    if (result.get("gpu_processes") or 0) > 1:
        lines.append(f"Measured while {result['gpu_processes'] - 1} other process(es) held the GPU: every timing "
                     "here includes their work and compares with nothing measured on an idle GPU.")
    if result.get("generate"):
        lines.append(_generate_line(result["generate"]))
    fraction = result.get("dense_fraction_of_limit")
    reached = f"; the dense loop reaches {fraction:.0%} of it" if fraction is not None else ""
    lines.append(f"Weights-bandwidth limit at batch 1: {result['bandwidth_limit_tokens_per_s']:.1f} tok/s "
                 f"({result['weight_bytes'] / 1e9:.2f} GB of weights at {result['copy_bandwidth_gb_per_s']:.0f} GB/s "
                 f"copy bandwidth){reached}.")
    for ffn in result.get("ffn", [])[:1]:
        if ffn.get("sparse_us") is not None:
            lines.append(f"FFNs alone (batch {ffn['batch_size']}, all layers, one step): dense {ffn['dense_us']:.1f} "
                         f"us, sparse {ffn['sparse_us']:.1f} us ({ffn['speedup']:.2f}x); largest relative difference "
                         f"of an FFN output, sparse vs dense: {ffn['max_rel_error']:.2e}.")
            if ffn.get("sparse_sequence_us") is not None:  # absent from results written before it was measured
                lines.append(f"FFNs in layer order as one sequence (each layer's weights as cold as in the step): "
                             f"dense {ffn['dense_sequence_us']:.1f} us, sparse {ffn['sparse_sequence_us']:.1f} us "
                             f"({ffn['sequence_speedup']:.2f}x).")
    if result.get("sparsity"):
        lines.append(f"Zero-ratio of x1 during decode: {result['sparsity']['overall']:.2%} "
                     f"over {result['sparsity']['tokens']} tokens.")
    return "\n".join(lines + _layer_table(result) + profile_tables(result))


def _number(value, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _generate_line(generate: dict) -> str:
    """HF generate's median tokens/s with its range over the repeats, per arm, and what the sparse arm's
    eager FFN calls ran: on CUDA sparsify runs them dense unless SparseConfig.eager, so its ratio is near
    1 by design, and the `eager_kernels` arm says what opting in would give."""
    def arm(name: str, label: str) -> str:
        if generate.get(f"{name}_tokens_per_s") is None:
            return ""
        low, high = generate.get(f"{name}_min_tokens_per_s"), generate.get(f"{name}_max_tokens_per_s")
        spread = f" [{low:.1f}-{high:.1f}]" if low is not None else ""
        return f"{label} {generate[f'{name}_tokens_per_s']:.1f} tok/s{spread}"

    ratio = f" ({generate['speedup']:.2f}x)" if generate.get("speedup") is not None else ""
    arms = ", ".join(filter(None, (arm("dense", "dense"), arm("sparse", "sparse"))))
    eager = ""
    if generate.get("eager_ffns") == "dense":
        eager = "; eager calls run dense (SparseConfig.eager)"
        if generate.get("eager_kernels_tokens_per_s") is not None:
            eager += (f", {arm('eager_kernels', 'with SparseConfig(eager=True)')} "
                      f"({generate['eager_kernels_speedup']:.2f}x)")
    elif generate.get("eager_ffns"):
        eager = f"; eager calls run the {generate['eager_ffns']}"
    return (f"HF generate (batch {generate['batch_size']}, {generate['new_tokens']} new tokens, default cache, "
            f"median [min-max] of {generate.get('repeats', 1)} alternated runs): {arms}{ratio}{eager}.")


def _layer_table(result: dict) -> list[str]:
    """Per layer: the zero-ratio of x1 at batch 1 and the union of active neurons at each union batch size."""
    union, sparsity = result.get("union"), result.get("sparsity")
    if not union or not sparsity:
        return []
    batches = union["batch_sizes"]
    lines = ["", "Union of active neurons per decode step (the rows the kernels read), mean over layers: " +
             ", ".join(f"{b} token{'s' * (b > 1)} {union['overall'][str(b)]:.1%}" for b in batches) + ".", "",
             "| layer | zeros (batch 1) | " + " | ".join(f"union, {b} tok" for b in batches) + " |",
             "| ---: | ---: |" + " ---: |" * len(batches)]
    for layer, zeros in enumerate(sparsity["per_layer"]):
        lines.append(f"| {layer} | {zeros:.1%} | " +
                     " | ".join(f"{union['per_layer'][str(b)][layer]:.1%}" for b in batches) + " |")
    return lines


def profile_tables(result: dict) -> list[str]:
    """`relufy speed --profile-steps`: per profiled batch size, each arm's step (timed, then under the
    profiler: wall, kernel, busy and idle time, kernels), each arm's top kernels, and the kernels whose
    time per step differs most between the arms. Kernel names are cut to `PROFILE_NAME_WIDTH` here; the
    JSON has them in full."""
    lines = []
    for entry in result.get("profile") or []:
        lines += _profile_summary(entry, result)
        for arm in ("dense", "sparse"):
            if entry[arm]:
                lines += _top_kernels(arm, entry[arm])
        if entry.get("diff"):
            lines += ["", f"Kernels whose time per step differs most, batch {entry['batch_size']} (sparse - dense):", "",
                      "| kernel | dense us | sparse us | sparse - dense us | dense calls | sparse calls |",
                      "| --- | ---: | ---: | ---: | ---: | ---: |"]
            lines += [f"| {_kernel_name(row['name'])} | {row['dense_us_per_step']:.1f} | {row['sparse_us_per_step']:.1f} | "
                      f"{row['delta_us_per_step']:+.1f} | {row['dense_count_per_step']:g} | "
                      f"{row['sparse_count_per_step']:g} |" for row in entry["diff"][:PROFILE_ROWS]]
    return lines


def _profile_summary(entry: dict, result: dict) -> list[str]:
    """One row per arm: the timed step and the FFNs alone of the same batch size beside the profile."""
    batch = entry["batch_size"]
    row = next((row for row in result.get("decode", []) if row["batch_size"] == batch), {})
    ffn = next((ffn for ffn in result.get("ffn", []) if ffn["batch_size"] == batch), {})
    methods = "; ".join(dict.fromkeys(entry[arm]["method"] for arm in ("dense", "sparse") if entry[arm]))
    lines = ["", f"Profile of {entry['steps']} decode steps per arm at batch {batch} (torch.profiler: {methods}); "
             "per step, idle = profiled step - busy (time when no kernel ran):", "",
             "| arm | timed step us | FFNs alone us | FFNs in sequence us | profiled step us | kernel us | busy us | "
             "idle us | kernels |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm in ("dense", "sparse"):
        if profile := entry[arm]:
            timed = row.get(f"{arm}_ms_per_step")
            lines.append(f"| {arm} | {_number(timed and 1e3 * timed)} | {_number(ffn.get(f'{arm}_us'))} | "
                         f"{_number(ffn.get(f'{arm}_sequence_us'))} | "
                         f"{profile['wall_us_per_step']:.1f} | {profile['kernel_us_per_step']:.1f} | "
                         f"{profile['busy_us_per_step']:.1f} | {profile['idle_us_per_step']:.1f} | "
                         f"{profile['kernels_per_step']:g} |")
    return lines


def _top_kernels(arm: str, profile: dict) -> list[str]:
    total = profile["kernel_us_per_step"]
    lines = ["", f"Top kernels, {arm} (of {len(profile['kernels'])} names, {profile['kernels_per_step']:g} "
             f"per step):", "", "| kernel | us per step | calls per step | share of kernel time |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {_kernel_name(row['name'])} | {row['us_per_step']:.1f} | {row['count_per_step']:g} | "
              f"{_number(total and row['us_per_step'] / total, '.1%')} |" for row in profile["kernels"][:PROFILE_ROWS]]
    return lines


def _kernel_name(name: str) -> str:
    """A kernel name for a Markdown cell: no pipe, no leading `void `, cut to `PROFILE_NAME_WIDTH`."""
    name = " ".join(name.replace("|", "/").split()).removeprefix("void ")
    return name if len(name) <= PROFILE_NAME_WIDTH else name[:PROFILE_NAME_WIDTH - 3] + "..."
