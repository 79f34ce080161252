"""What lm-eval's results say a model scored: the metric that stands for each task, the averages of
benchmark groups (the ProSparse paper's average of group averages), and their standard errors."""

from __future__ import annotations

import math

# The metric that stands for a task, in order of preference (lm-eval keys are "metric,filter").
SCORE_METRICS = ("acc_norm", "acc", "exact_match", "pass@1", "pass_at_1", "f1", "em")
LOSS_METRICS = ("word_perplexity", "perplexity", "bits_per_byte")
# Score metrics that are 0 or 1 for each example: a task's score is then a proportion, with a closed-form error.
BINARY_METRICS = ("acc_norm", "acc", "exact_match", "em")


def main_metric(task_result: dict) -> tuple[str, float] | None:
    """(metric name, value) that represents one lm-eval task result: an accuracy if any, else a perplexity."""
    entry = _main_entry(task_result)
    return None if entry is None else (entry[0].split(",")[0], entry[1])


def task_scores(harness: dict) -> dict[str, tuple[str, float]]:
    """{task or group: (metric, value)} from lm-eval's results dict."""
    merged = {**harness.get("results", {}), **harness.get("groups", {})}
    return {name: metric for name, result in merged.items() if (metric := main_metric(result)) is not None}


def group_averages(harness: dict, groups: dict[str, list[str]]) -> dict:
    """Per benchmark group: the mean accuracy (in %) of its tasks, and `average` over groups (ProSparse style)."""
    scores = task_scores(harness)
    out: dict[str, float] = {}
    for group, members in groups.items():
        values = [scores[name][1] * 100 for name in members if name in scores and scores[name][0] in SCORE_METRICS]
        if values:
            out[group] = sum(values) / len(values)
    if out:
        out["average"] = sum(out.values()) / len(out)
    return out


def score_stderr(harness: dict, task: str) -> float | None:
    """The standard error, in points, of the accuracy that stands for `task`; None where it is not known.

    relufy runs lm-eval with `bootstrap_iters=0` (its bootstrap resamples metrics such as the perplexity
    task's in a pool of worker processes), so lm-eval records "N/A". For a metric that is 0 or 1 per example
    the standard error of the mean is sqrt(p (1 - p) / (n - 1)) over the n examples scored, which is what
    lm-eval's closed form (sample standard deviation over sqrt(n)) gives for it. A stderr lm-eval did record
    is used as it is.
    """
    result = {**harness.get("results", {}), **harness.get("groups", {})}.get(task, {})
    entry = _main_entry(result)
    if entry is None:
        return None
    key, accuracy = entry
    metric, _, name = key.partition(",")
    if metric not in SCORE_METRICS:
        return None
    recorded = result.get(f"{metric}_stderr,{name}")
    if _is_number(recorded):
        return float(recorded) * 100
    scored = (harness.get("n-samples", {}).get(task) or {}).get("effective")
    if metric not in BINARY_METRICS or not _is_number(scored) or scored < 2:
        return None
    return math.sqrt(accuracy * (1 - accuracy) / (scored - 1)) * 100


def group_stderrs(harness: dict, groups: dict[str, list[str]]) -> dict:
    """The standard errors, in points, of `group_averages`: each group's mean of its tasks' accuracies, the
    tasks counted as independent (they score different examples), so sqrt(sum of squares) / k; `average`
    likewise over the groups. A group with a task whose error is not known has none, and then neither
    has `average`."""
    scores = task_scores(harness)
    out: dict[str, float] = {}
    scored_groups = 0  # the groups `group_averages` averages: those with a scored task
    for group, members in groups.items():
        errors = [score_stderr(harness, name) for name in members
                  if name in scores and scores[name][0] in SCORE_METRICS]
        scored_groups += bool(errors)
        if errors and None not in errors:
            out[group] = _mean_stderr(errors)
    if out and len(out) == scored_groups:
        out["average"] = _mean_stderr(list(out.values()))
    return out


def suite_stderrs(result: dict) -> dict:
    """`group_stderrs` of a `relufy evaluate` results.json, from its lm-eval record and the groups it ran."""
    return group_stderrs(result.get("lm_eval", {}), result.get("settings", {}).get("groups", {}))


def _main_entry(task_result: dict) -> tuple[str, float] | None:
    """main_metric's lm-eval key ("metric,filter") and value."""
    for wanted in SCORE_METRICS + LOSS_METRICS:
        for key, value in task_result.items():
            if key.split(",")[0] == wanted and _is_number(value):
                return key, float(value)
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mean_stderr(errors: list[float]) -> float:
    return math.sqrt(sum(error * error for error in errors)) / len(errors)
