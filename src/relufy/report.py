"""Side-by-side tables of measured results (sparsity JSONs now; evaluation results.json too)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError


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


def main(argv: list[str] | None = None) -> None:
    """`python -m relufy.report A.json B.json`: print the sparsity table (used by `make demo`)."""
    import sys

    paths = argv if argv is not None else sys.argv[1:]
    print(sparsity_table([load_result(p) for p in paths], [Path(p).stem for p in paths]))


if __name__ == "__main__":
    main()
