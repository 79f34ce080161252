"""Plots for docs/results.md from the arms' trainer_state.json and results.json.

    python bench/plot_reproduction.py docs/results/smollm2-135m --tokens-per-step 16384
    python bench/plot_reproduction.py docs/results/smollm2-135m-long --trained relu prosparse-peak5e-3 \
        --evaluated relu prosparse-peak5e-3 prosparse+shift-peak5e-3
writes DIR/curves.png (lambda, LM loss, x1 zero-ratio against training tokens) and
DIR/per_layer.png (zero-ratio of x1 per layer on the lm-eval tokens).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TRAINED = ["relu", "prosparse-peak5e-3", "prosparse-peak1e-2", "prosparse-peak2e-2", "fixed-l1-1e-2", "fixed-l1-2e-2"]
EVALUATED = ["original", "relu", "prosparse+shift-peak5e-3", "prosparse+shift-peak1e-2", "prosparse+shift-peak2e-2",
             "fixed-l1-2e-2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--tokens-per-step", type=int, default=16 * 1024)
    parser.add_argument("--trained", nargs="+", default=TRAINED, help="arms whose training curves to plot")
    parser.add_argument("--evaluated", nargs="+", default=EVALUATED, help="arms whose per-layer sparsity to plot")
    args = parser.parse_args()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for arm in args.trained:
        history = json.loads((args.directory / arm / "trainer_state.json").read_text())["log_history"]
        rows = [row for row in history if "l1_lambda" in row]
        tokens = [row["step"] * args.tokens_per_step / 1e6 for row in rows]
        axes[0].plot(tokens, [row["l1_lambda"] for row in rows], label=arm)
        axes[1].plot(tokens, [row["lm_loss"] for row in rows], label=arm)
        axes[2].plot(tokens, [row["activation_sparsity"] for row in rows], label=arm)
    for axis, title in zip(axes, ["lambda", "LM loss (training batches)", "x1 zero-ratio (training batches)"]):
        axis.set_title(title)
        axis.set_xlabel("training tokens (millions)")
        axis.grid(alpha=0.3)
    axes[1].set_ylim(top=8)  # fixed-l1 jumps far higher; the bottom follows the data
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.directory / "curves.png", dpi=110)

    fig, axis = plt.subplots(figsize=(8, 4.5))
    for arm in args.evaluated:
        result = json.loads((args.directory / arm / "results.json").read_text())
        per_layer = result["sparsity"]["per_layer"]
        axis.plot(range(len(per_layer)), per_layer, marker=".", label=arm)
    axis.set_xlabel("layer")
    axis.set_ylabel("x1 zero-ratio on lm-eval tokens")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.directory / "per_layer.png", dpi=110)
    print(f"wrote {args.directory / 'curves.png'} and {args.directory / 'per_layer.png'}")


if __name__ == "__main__":
    main()
