"""Figures of a collected run (`run.py collect OUT_DIR DEST`), and the trade-off across runs.

    python experiments/prosparse-smollm2/plots.py curves DEST [--tokens-per-step 16384]
        DEST/curves.png: lambda, LM loss and x1 zero-ratio against training tokens, every trained arm;
        DEST/per_layer.png: zero-ratio of x1 per layer on the lm-eval tokens, every evaluated arm.
    python experiments/prosparse-smollm2/plots.py frontier --out frontier.png --run LABEL DEST [--run ...]
        each run's prosparse+shift arm: zero-ratio against its perplexity and accuracy cost relative
        to the relu arm trained on the same tokens, with the target region shaded; runs given the
        same LABEL (e.g. several --peak values) form one line.

The arms are found by their folders: a folder with trainer_state.json was trained, one with
results.json was evaluated (the names are run.py's).
"""

from __future__ import annotations

import argparse
import json
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
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(directory / "per_layer.png", dpi=110)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    p = sub.add_parser("curves", help="training curves and per-layer sparsity of one collected run")
    p.add_argument("directory", type=Path)
    p.add_argument("--tokens-per-step", type=int, default=16 * 1024, help="batch x block of the run")
    p = sub.add_parser("frontier", help="each run's ProSparse arms against its ReLU arm")
    p.add_argument("--run", nargs=2, action="append", required=True, metavar=("LABEL", "DIR"))
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.figure == "curves":
        curves(args.directory, args.tokens_per_step)
    else:
        frontier([(label, Path(directory)) for label, directory in args.run], args.out)


if __name__ == "__main__":
    main()
