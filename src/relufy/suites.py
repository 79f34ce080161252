"""What lm-eval runs: task names with few-shot counts and the benchmark groups they form.

A relufy suite is an lm-eval group YAML in `evaluate/tasks/` (`relufy_offline.yaml`,
`relufy_prosparse.yaml`), so `relufy evaluate --suite prosparse` and `lm_eval --include_path
evaluate/tasks --tasks relufy_prosparse` run the same tasks with the same few-shot counts. relufy
reads the YAML as lm-eval's task index parsed it and runs its tasks one at a time (the probe counts
zeros per task); each subgroup is one benchmark group of the report, named by its `group_alias`,
and the tasks listed directly under the suite's group form one named by the suite's alias.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field, fields
from pathlib import Path

from .checks import (BATCH_LIMIT, COUNT_LIMIT, CommaList, int_in_range, listed, number_in_range, option,
                     positive_int)
from .errors import DataError
from .paths import project_file

# --suite name -> its lm-eval group, defined by evaluate/tasks/<group>.yaml
SUITES: dict[str, str] = {"prosparse": "relufy_prosparse", "offline": "relufy_offline"}

_GROUP_KEYS = {"group", "group_alias", "task", "aggregate_metric_list", "metadata"}
_MEMBER_KEYS = {"task", "group", "num_fewshot"}


def tasks_dir() -> Path:
    """relufy's own lm-eval task folder (the `--include_path` for lm-eval)."""
    return project_file("evaluate/tasks")


DEFAULT_HELDOUT = tasks_dir() / "data" / "heldout.jsonl"  # held-out text of PPL-p% and `relufy matched`


@dataclass
class EvalPlan:
    """What to run: lm-eval task names with few-shot counts (None: the task's own), and the benchmark groups they form."""

    tasks: dict[str, int | None]
    groups: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class SuiteOptions:
    """Which lm-eval tasks run and how: names and/or a relufy suite, few-shot counts, examples per task,
    batch and context, code execution, per-example records. The `help` of each field is its flag's help."""

    tasks: CommaList | None = option(
        None, "comma-separated lm-eval task or group names (e.g. piqa,hellaswag,relufy_offline)")
    suite: str | None = option(
        None, "preset: 'prosparse' = the ProSparse paper's benchmark groups (needs network for data); 'offline' = "
        "relufy's own tasks", choices=tuple(SUITES))
    num_fewshot: int | None = option(None, "override every task's few-shot count")
    include_path: list[Path] = option(
        help="extra lm-eval task folder (repeat it for several)", default_factory=list, action="append")
    limit: float | None = option(None, "examples per task (int) or fraction (<1): a quick slice")
    batch_size: int = option(1, "lm-eval batch size")
    max_length: int | None = option(None, "context length for lm-eval (default: the model's)")
    confirm_run_unsafe_code: bool = option(False, "allow tasks that execute model-written code (HumanEval, MBPP)")
    log_samples: bool = option(
        False, "also write lm-eval's per-example records (inputs, answers, scores) to OUTPUT/samples_TASK.jsonl")

    def __post_init__(self) -> None:
        if self.tasks is not None:
            self.tasks = list(listed("--tasks", self.tasks))
        # `--include-path` given several times arrives as one list per flag
        self.include_path = [Path(p) for item in self.include_path
                             for p in (item if isinstance(item, (list, tuple)) else [item])]
        positive_int("--batch-size", self.batch_size, BATCH_LIMIT)
        if self.limit is not None:
            number_in_range("--limit", self.limit, 0, COUNT_LIMIT, low_open=True)
        if self.num_fewshot is not None:
            int_in_range("--num-fewshot", self.num_fewshot, 0, 1024)
        if self.max_length is not None:
            int_in_range("--max-length", self.max_length, 2, 1 << 24)

    def suite_options(self) -> SuiteOptions:
        """Only the lm-eval options, for a command's config that extends them."""
        return SuiteOptions(**{f.name: getattr(self, f.name) for f in fields(SuiteOptions)})

    def plan(self) -> EvalPlan:
        return make_plan(self.tasks, self.suite, self.num_fewshot)


def make_plan(tasks: list[str] | None, suite: str | None, num_fewshot: int | None = None) -> EvalPlan:
    """Tasks from `--tasks` and/or `--suite` (default: the offline suite); `num_fewshot` replaces every count."""
    if suite is not None and suite not in SUITES:
        raise DataError(f"unknown suite '{suite}'; choose one of: {', '.join(SUITES)}")
    plan = EvalPlan(tasks={})
    if suite or not tasks:
        plan = suite_plan(suite or "offline")
        if num_fewshot is not None:
            plan.tasks = dict.fromkeys(plan.tasks, num_fewshot)
    for name in tasks or []:
        plan.tasks[name] = num_fewshot
    return plan


def suite_plan(suite: str) -> EvalPlan:
    """The plan of a relufy suite, read from its group YAML as lm-eval's task index parsed it."""
    group = SUITES[suite]
    entry = _manager((str(tasks_dir()),), include_defaults=False).task_index.get(group)
    if entry is None or entry.cfg is None:
        raise DataError(f"suite '{suite}' is the lm-eval group '{group}', which lm-eval cannot read from "
                        f"{tasks_dir() / (group + '.yaml')}; restore that file from the project")
    return read_group(entry.cfg, where=f"{group}.yaml")


def read_group(config: dict, plan: EvalPlan | None = None, *, where: str = "group config") -> EvalPlan:
    """The plan of an lm-eval group config: its own tasks form one benchmark group (named by its alias), each
    inline subgroup (a `group:` entry with its own `task:` list) another. A member is a name, or a
    `task:` or `group:` reference with an optional `num_fewshot`."""
    plan = plan if plan is not None else EvalPlan(tasks={})
    _only(config, _GROUP_KEYS, where)
    name = config.get("group_alias") or config["group"]
    for member in config.get("task") or []:
        if isinstance(member, dict) and "group" in member and "task" in member:
            read_group(member, plan, where=where)
            continue
        if isinstance(member, str):
            task, shots = member, None
        else:
            _only(member, _MEMBER_KEYS, where)
            task, shots = member.get("task") or member["group"], member.get("num_fewshot")
        plan.tasks[task] = shots
        plan.groups.setdefault(name, []).append(task)
    return plan


def _only(config: dict, allowed: set[str], where: str) -> None:
    """relufy reads a subset of lm-eval's group schema; a key outside it would make relufy and lm-eval differ."""
    extra = sorted(set(config) - allowed)
    if extra:
        raise DataError(f"{where}: relufy's suite reader does not know '{extra[0]}' (it reads "
                        f"{', '.join(sorted(allowed))}); remove it or teach relufy.suites to read it")


def check_task_names(names: list[str], task_manager) -> None:
    """Fail before loading the model when a task name is unknown, listing close matches."""
    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}?" if close else "; list tasks with `lm_eval ls tasks`"
            raise DataError(f"unknown lm-eval task '{name}'{hint}")


def task_manager(names: list[str], include_path: list[Path] | None = None):
    """An lm-eval TaskManager that knows `names`: relufy's own tasks only when that is enough (indexing
    all of lm-eval's tasks takes seconds), else lm-eval's as well. Unknown names raise DataError."""
    paths = tuple(str(p) for p in [tasks_dir(), *(include_path or [])])
    manager = _manager(paths, include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = _manager(paths, include_defaults=True)
    check_task_names(names, manager)
    return manager


@functools.lru_cache(maxsize=4)
def _manager(include_path: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path), include_defaults=include_defaults)
