"""Figures of a collected run (`run.py collect OUT_DIR DEST`), and the trade-off across runs.

    python experiments/prosparse-smollm2/plots.py curves DEST [--tokens-per-step 16384]
        DEST/curves.png: lambda, LM loss and x1 zero-ratio against training tokens, every trained arm;
        DEST/per_layer.png: zero-ratio of x1 per layer on the lm-eval tokens, every evaluated arm.
    python experiments/prosparse-smollm2/plots.py frontier --out frontier.png --run LABEL DEST [--run ...]
        each run's prosparse+shift arm: zero-ratio against its perplexity and accuracy cost relative
        to the relu arm trained on the same tokens, with the target region shaded; runs given the
        same LABEL (e.g. several --peak values) form one line.
    python experiments/prosparse-smollm2/plots.py matched DEST [--folder matched-x1] [--also LABEL DIR ...]
            [--out DEST/matched.png]
        every route of `run.py matched` (DEST/matched: thresholds on the activation; matched-x1: on x1): left,
        the zero-ratio on the held-out text against held-out perplexity,
        one curve per route (its dense model, the CURVE points and the matched ones); right, the suite
        average of its dense evaluation and at the matched zero-ratios; matched zero-ratios marked; a
        distilled route (-kd) is dashed, in its undistilled route's colour; each --also run's routes join as
        "ROUTE (LABEL)" (e.g. --also "peak 2e-3" DEST-peak2e-3).
    python experiments/prosparse-smollm2/plots.py tokens --out tokens.png DEST_10M DEST_30M DEST_90M
        left, each arm's held-out perplexity (relu, prosparse+shift and their -kd arms) against training
        tokens; right, the ProSparse (+shift) / ReLU held-out perplexity ratio, and ProSparse-KD / ReLU-KD,
        each with the fit ratio = a + b log10(tokens), its slope b (per tenfold tokens) and the token count
        where the fitted line reaches 1.05x; the numbers also go to the same name with .json.

The arms are found by their folders: a folder with trainer_state.json was trained, one with
results.json was evaluated (the names are run.py's).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGET_ZEROS, TARGET_PPL_RATIO, TARGET_POINTS = 0.85, 1.05, -1.0  # the reproduction's three targets


def arms_with(directory: Path, file: str) -> list[Path]:
    return sorted(path.parent for path in directory.glob(f"*/{file}"))


def curves(directory: Path, tokens_per_step: int) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for arm in arms_with(directory, "trainer_state.json"):
        if arm.name.endswith("+shift"):  # the same training as the arm without the suffix
            continue
        history = json.loads((arm / "trainer_state.json").read_text())["log_history"]
        rows = [row for row in history if "l1_lambda" in row]
        tokens = [row["step"] * tokens_per_step / 1e6 for row in rows]
        for axis, key in zip(axes, ("l1_lambda", "lm_loss", "activation_sparsity")):
            axis.plot(tokens, [row[key] for row in rows], label=arm.name)
    for axis, title in zip(axes, ["lambda", "LM loss (training batches)", "x1 zero-ratio (training batches)"]):
        axis.set_title(title)
        axis.set_xlabel("training tokens (millions)")
        axis.grid(alpha=0.3)
    axes[1].set_ylim(top=8)  # a fixed lambda sends the loss far higher; the bottom follows the data
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(directory / "curves.png", dpi=110)

    fig, axis = plt.subplots(figsize=(8, 4.5))
    for arm in arms_with(directory, "results.json"):
        per_layer = json.loads((arm / "results.json").read_text())["sparsity"]["per_layer"]
        axis.plot(range(len(per_layer)), per_layer, marker=".", label=arm.name)
    axis.set_xlabel("layer")
    axis.set_ylabel("x1 zero-ratio on lm-eval tokens")
    save(fig, directory / "per_layer.png", axis)
    print(f"wrote {directory / 'curves.png'} and {directory / 'per_layer.png'}")


def measures(folder: Path) -> tuple[float, float, float]:
    """(zero-ratio on the lm-eval tokens, dense held-out perplexity, suite average) of one evaluation."""
    results = json.loads((folder / "results.json").read_text())
    dense = next(iter(results["ppl_p_sparsity"].values()))["ppl_dense"]
    return results["sparsity"]["overall"], dense, results["scores"]["average"]


def frontier(runs: list[tuple[str, Path]], out: Path) -> None:
    """One line per label: the runs given that label (e.g. several peaks) sorted by zero-ratio."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for label, directory in runs:
        zeros, ppl, suite = measures(directory / "prosparse+shift")
        _, relu_ppl, relu_suite = measures(directory / "relu")
        lines.setdefault(label, []).append((100 * zeros, ppl / relu_ppl, suite - relu_suite))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for label, points in lines.items():
        zeros, ppl_ratio, points_lost = zip(*sorted(points))
        left.plot(zeros, ppl_ratio, "o-", label=label)
        right.plot(zeros, points_lost, "o-", label=label)
    for axis, bound, top in ((left, TARGET_PPL_RATIO, False), (right, TARGET_POINTS, True)):
        lower, upper = axis.get_ylim()
        lower, upper = (lower, max(upper, bound + 1)) if top else (min(lower, bound / 1.5), upper)  # show the target
        axis.axvspan(100 * TARGET_ZEROS, max(100, axis.get_xlim()[1]), alpha=0.08, color="green")
        axis.fill_between([100 * TARGET_ZEROS, 100], bound, upper if top else lower, alpha=0.2, color="green",
                          label="target")
        axis.set_ylim(lower, upper)
        axis.set_xlabel("zero-ratio of x1 on the lm-eval tokens (%)")
        axis.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("held-out perplexity / ReLU arm's")
    right.set_ylabel("suite average − ReLU arm's (points)")
    left.set_title("perplexity cost")
    right.set_title("accuracy cost")
    left.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def save(fig, out: Path, *axes) -> None:
    """Grid and legend on every panel, tight layout, PNG: how every figure here ends."""
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def route_points(directory: Path, route: str, folder: str = "matched") -> list[tuple[float, float]]:
    """(zero-ratio on the held-out text, held-out perplexity) of one route: dense, then every target, sorted."""
    points = set()
    for path in (directory / folder / f"{route}.json", directory / folder / f"{route}-curve.json"):
        if path.exists():
            result = json.loads(path.read_text())
            points.add((result["dense"]["zero_ratio"], result["dense"]["ppl"]))
            points.update((entry["zero_ratio"], entry["ppl"]) for entry in result["targets"])
    return sorted(points)


def suite_points(directory: Path, route: str, folder: str = "matched") -> list[tuple[float, float]]:
    """(zero-ratio on the lm-eval tokens, suite average) of one route: its dense evaluation (a collected
    folder of that name) and every matched target that ran the suite, sorted."""
    points = set()
    evaluation = directory / route / "results.json"
    if evaluation.exists():
        results = json.loads(evaluation.read_text())
        points.add((results["sparsity"]["overall"], results["scores"]["average"]))
    matched = directory / folder / f"{route}.json"
    for entry in json.loads(matched.read_text())["targets"] if matched.exists() else []:
        if entry.get("scores"):
            points.add((entry["sparsity"]["overall"], entry["scores"]["average"]))
    return sorted(points)


def matched_figure(directory: Path, out: Path, folder: str = "matched",
                   also: tuple[tuple[str, Path], ...] = ()) -> None:
    """One curve per route, perplexity (left) and suite average (right) against zero-ratio; dotted lines at
    the zero-ratios every route was matched at (where the suite ran). `folder`: matched (thresholds on the
    activation) or matched-x1 (on x1). `also`: (LABEL, DIR) of further collected runs (another peak lambda)
    whose routes join the figure as "ROUTE (LABEL)", so every route at matched sparsity shares one figure."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    colours: dict[str, str] = {}  # a -kd route takes its route's colour, dashed
    for name, run, route in sorted(matched_series(directory, folder, also), key=lambda s: ("-kd" in s[0], s[0])):
        plain = name.replace("-kd", "")
        style = "s--" if plain != name else "o-"
        zeros, ppl = zip(*route_points(run, route, folder))
        line = left.plot([100 * z for z in zeros], ppl, style, label=name, color=colours.get(plain))
        colours.setdefault(plain, line[0].get_color())
        suite = suite_points(run, route, folder)
        if suite:
            zeros, scores = zip(*suite)
            # three measured points, no curve between them: a thin dotted line only pairs them up
            right.plot([100 * z for z in zeros], scores, style[0] + ":", label=name, color=colours[plain],
                       linewidth=0.8)
        matched = run / folder / f"{route}.json"
        for entry in json.loads(matched.read_text())["targets"] if matched.exists() else []:
            for axis in (left, right):
                axis.axvline(100 * entry["target"], color="grey", linestyle=":", linewidth=1)
    on_x1 = folder.endswith("x1")
    left.set_yscale("log")
    left.set_xlabel(f"zero-ratio of {'x1' if on_x1 else 'the activation'} on the held-out text (%)")
    left.set_ylabel("held-out perplexity")
    left.set_title(f"perplexity, thresholded on {'x1' if on_x1 else 'the activation'} to matched zero-ratios")
    right.set_xlabel("zero-ratio of x1 on the lm-eval tokens (%)")
    right.set_ylabel("offline suite average")
    right.set_title("suite: dense and at the matched zero-ratios")
    save(fig, out, left, right)
    print(f"wrote {out}")


def matched_series(directory: Path, folder: str, also: tuple[tuple[str, Path], ...]) -> list[tuple[str, Path, str]]:
    """(legend name, collected run, route) of every route with a JSON in RUN/FOLDER: DIRECTORY's by their own
    names, each `also` run's as "ROUTE (LABEL)"."""
    series = []
    for label, run in (("", directory), *also):
        names = (path.name.removesuffix(".json").removesuffix("-curve") for path in (run / folder).glob("*.json"))
        routes = sorted(set(names))
        if not routes:
            raise SystemExit(f"plots.py: {run / folder} holds no route's JSON; pass a run that `run.py collect` "
                             f"wrote with a {folder}/ folder")
        series += [(f"{route} ({label})" if label else route, run, route) for route in routes]
    return series


def fit_trend(tokens: list[float], ratios: list[float], goal: float = TARGET_PPL_RATIO) -> dict:
    """Least squares ratio = a + b log10(tokens), and the tokens where that line reaches `goal` (None if never).

    A straight line in log tokens is the simplest trend three budgets can support; the crossing is an
    extrapolation from them, not a prediction the data can vouch for.
    """
    xs = [math.log10(t) for t in tokens]
    mean_x, mean_y = sum(xs) / len(xs), sum(ratios) / len(ratios)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ratios)) / spread if spread else float("nan")
    intercept = mean_y - slope * mean_x
    at_goal = 10 ** ((goal - intercept) / slope) if slope < 0 else None  # a flat or rising trend never gets there
    return {"slope_per_decade": slope, "intercept": intercept, "goal": goal, "tokens_at_goal": at_goal,
            "monotonic_decrease": all(b < a for a, b in zip(ratios, ratios[1:]))}


# The tokens figure's ratios: (key in tokens.json, label, sparse arm, its dense baseline trained the same way)
RATIO_SERIES = (("plain", "ProSparse / ReLU", "prosparse+shift", "relu"),
                ("kd", "ProSparse-KD / ReLU-KD", "prosparse-kd+shift", "relu-kd"))
TOKEN_ARMS = ("relu", "relu-kd", "prosparse+shift", "prosparse-kd+shift")  # the left panel's perplexities


def budget_tokens(directory: Path) -> int:
    """Training tokens per arm of one collected budget (every arm of a budget shares steps, batch and block)."""
    settings = json.loads((directory / "settings.json").read_text())
    arm = settings.get("prosparse") or next(iter(settings.values()))
    return arm["steps"] * arm["batch"] * arm.get("grad_accum", 1) * arm["block"]


def ratio_series(directories: list[Path]) -> dict[str, dict]:
    """Each RATIO_SERIES with both its arms in at least one budget: its points and, from two budgets on, the fit."""
    series = {}
    for key, label, sparse, dense in RATIO_SERIES:
        rows = [{"run": str(d), "tokens": budget_tokens(d),
                 "ppl_ratio": measures(d / sparse)[1] / measures(d / dense)[1]}
                for d in directories if all((d / arm / "results.json").exists() for arm in (sparse, dense))]
        rows.sort(key=lambda row: row["tokens"])
        if rows:
            fit = fit_trend([r["tokens"] for r in rows], [r["ppl_ratio"] for r in rows]) if len(rows) > 1 else {}
            series[key] = {"label": label, "points": rows, **fit}
    if not series:
        raise SystemExit("no budget has both relu and prosparse+shift (or relu-kd and prosparse-kd+shift) evaluated")
    return series


def tokens_figure(directories: list[Path], out: Path) -> dict:
    """Left: each arm's held-out perplexity against training tokens (with and without KD, one curve each).
    Right: the ProSparse/ReLU perplexity ratio of each budget, with and without KD, each with its fit and
    the 1.05x crossing. tokens.json: the plain series at the top level, the KD series under "kd"."""
    series = ratio_series(directories)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    colours: dict[str, str] = {}  # a -kd arm takes its arm's colour, dashed
    for arm in TOKEN_ARMS:
        points = sorted((budget_tokens(d), measures(d / arm)[1]) for d in directories
                        if (d / arm / "results.json").exists())
        if points:
            plain = arm.replace("-kd", "")
            line = left.plot(*zip(*points), "s--" if plain != arm else "o-", label=arm, color=colours.get(plain))
            colours.setdefault(plain, line[0].get_color())
    for key, part in series.items():
        tokens = [row["tokens"] for row in part["points"]]
        shown = right.plot(tokens, [row["ppl_ratio"] for row in part["points"]], "s" if key == "kd" else "o",
                           label=part["label"])
        if "slope_per_decade" in part:
            end = max(tokens[-1], part["tokens_at_goal"] or 0)
            line = [tokens[0] * (end / tokens[0]) ** (i / 50) for i in range(51)]
            right.plot(line, [part["intercept"] + part["slope_per_decade"] * math.log10(t) for t in line], "--",
                       color=shown[0].get_color(), label=f"fit: {part['slope_per_decade']:+.3f} per 10x tokens")
    right.axhline(TARGET_PPL_RATIO, color="green", alpha=0.5, label=f"{TARGET_PPL_RATIO}x")
    for axis in (left, right):
        axis.set_xscale("log")
        axis.set_xlabel("training tokens per arm")
    left.set_yscale("log")
    left.set_ylabel("held-out perplexity")
    right.set_ylabel("held-out perplexity: ProSparse (+shift) / ReLU")
    save(fig, out, left, right)
    summary = {**series.get("plain", {}), **({"kd": series["kd"]} if "kd" in series else {})}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    p = sub.add_parser("curves", help="training curves and per-layer sparsity of one collected run")
    p.add_argument("directory", type=Path)
    p.add_argument("--tokens-per-step", type=int, default=16 * 1024, help="batch x block of the run")
    p = sub.add_parser("frontier", help="each run's ProSparse arms against its ReLU arm")
    p.add_argument("--run", nargs=2, action="append", required=True, metavar=("LABEL", "DIR"))
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("matched", help="zero-ratio against held-out perplexity, one curve per route")
    p.add_argument("directory", type=Path, help="a collected run with matched/ (run.py collect)")
    p.add_argument("--folder", default="matched", choices=["matched", "matched-x1"],
                   help="the thresholds' run.py folder: matched (on the activation) or matched-x1 (on x1)")
    p.add_argument("--also", nargs=2, action="append", default=[], metavar=("LABEL", "DIR"),
                   help="another collected run whose routes join the figure as ROUTE (LABEL), e.g. another peak")
    p.add_argument("--out", type=Path, help="default: DIRECTORY/FOLDER.png")
    p = sub.add_parser("tokens", help="the ProSparse/ReLU perplexity ratio against training tokens, fitted")
    p.add_argument("directories", type=Path, nargs="+", help="one collected run per token budget")
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.figure == "curves":
        curves(args.directory, args.tokens_per_step)
    elif args.figure == "matched":
        matched_figure(args.directory, args.out or args.directory / f"{args.folder}.png", args.folder,
                       tuple((label, Path(run)) for label, run in args.also))
    elif args.figure == "tokens":
        tokens_figure(args.directories, args.out)
    else:
        frontier([(label, Path(directory)) for label, directory in args.run], args.out)


if __name__ == "__main__":
    main()
