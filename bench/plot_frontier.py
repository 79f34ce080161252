"""The issue-5 trade-off in one figure: each ProSparse arm's zero-ratio against its cost relative to
the ReLU arm trained on the same tokens, with the target region shaded.

    python bench/plot_frontier.py --out docs/results/frontier.png \
        --run "600 steps, LR 1e-4" docs/results/smollm2-135m/relu docs/results/smollm2-135m/prosparse+shift-peak5e-3 ... \
        --run ...

Each --run is a label, the ReLU arm's folder, then the arms to compare with it (folders holding a
`relufy evaluate` results.json). Left: held-out perplexity / the ReLU arm's (target <= 1.05).
Right: suite average minus the ReLU arm's, in points (target >= -1). x: zero-ratio of x1 on the
lm-eval tokens (target >= 85%).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGET_ZEROS, TARGET_PPL_RATIO, TARGET_POINTS = 0.85, 1.05, -1.0


def measures(folder: Path) -> tuple[float, float, float]:
    """(zero-ratio on the lm-eval tokens, dense held-out perplexity, suite average) of one evaluation."""
    results = json.loads((folder / "results.json").read_text())
    dense = next(iter(results["ppl_p_sparsity"].values()))["ppl_dense"]
    return results["sparsity"]["overall"], dense, results["scores"]["average"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", action="append", required=True, metavar="LABEL RELU ARM",
                        help="a label, the ReLU arm's folder, then one or more arms' folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for label, relu, *arms in args.run:
        _, relu_ppl, relu_suite = measures(Path(relu))
        points = [measures(Path(arm)) for arm in arms]
        zeros = [100 * z for z, _, _ in points]
        left.plot(zeros, [ppl / relu_ppl for _, ppl, _ in points], "o-", label=label)
        right.plot(zeros, [suite - relu_suite for _, _, suite in points], "o-", label=label)
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
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
