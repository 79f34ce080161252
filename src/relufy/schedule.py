"""lambda(step): the ProSparse progressive regularization schedule (docs/method.md, section 2), no torch.

A schedule is a list of stages `{lambda, end_step}` with cumulative `end_step`s counted in
optimizer steps. Step t (1-based: the t-th optimizer update) falls in the first stage with
t <= end_step:

- leading stages with lambda = 0: plain training;
- the first stage with lambda > 0: constant warm-up at that lambda;
- every later stage i: lambda rises (or falls) from lambda_{i-1} to lambda_i along
  eta = 0.5 * (sin(-pi/2 + pi * (t - T_{i-1}) / (T_i - T_{i-1})) + 1), so equal neighbours
  give a constant "stability" stage;
- after the last end_step lambda stays at the last stage's value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import RecipeError


@dataclass(frozen=True)
class Stage:
    """One entry of `stages:` in a recipe: the target lambda, reached at `end_step`."""

    lam: float
    end_step: int


@dataclass(frozen=True)
class Schedule:
    """The validated stages and `lambda_at(step)`."""

    stages: tuple[Stage, ...]

    @classmethod
    def from_config(cls, entries: Iterable[Mapping] | None) -> "Schedule":
        """Validate a recipe's `stages:` list (mappings with `lambda` and `end_step`)."""
        stages = []
        previous_end = 0
        for index, entry in enumerate(entries or []):
            where = f"stages[{index}]"
            if not isinstance(entry, Mapping):
                raise RecipeError(f"{where} must be a mapping like {{lambda: 0.01, end_step: 1000}}, got {entry!r}")
            unknown = sorted(set(entry) - {"lambda", "end_step"})
            if unknown:
                raise RecipeError(f"{where} has unknown key(s) {', '.join(map(str, unknown))}; "
                                  "each stage has exactly 'lambda' and 'end_step'")
            for key in ("lambda", "end_step"):
                if key not in entry:
                    raise RecipeError(f"{where} lacks '{key}'; each stage has 'lambda' and 'end_step'")
            lam, end = entry["lambda"], entry["end_step"]
            if isinstance(lam, str):
                lam = _float_or_none(lam)
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
                raise RecipeError(f"{where}.lambda must be a finite number, got {entry['lambda']!r}")
            if lam < 0:
                raise RecipeError(f"{where}.lambda is {lam}; lambda must be >= 0")
            if isinstance(end, bool) or not isinstance(end, int):
                raise RecipeError(f"{where}.end_step must be an integer (optimizer steps), got {end!r}")
            if end <= previous_end:
                raise RecipeError(f"{where}.end_step is {end} but must be greater than the previous stage's "
                                  f"end_step ({previous_end}); end_step is cumulative")
            stages.append(Stage(float(lam), end))
            previous_end = end
        return cls(tuple(stages))

    @property
    def last_step(self) -> int:
        """The last stage's end_step (0 for an empty schedule)."""
        return self.stages[-1].end_step if self.stages else 0

    @property
    def max_lambda(self) -> float:
        return max((s.lam for s in self.stages), default=0.0)

    def lambda_at(self, step: int) -> float:
        """The lambda in effect for optimizer step `step` (1-based)."""
        if not self.stages:
            return 0.0
        warmup = next((i for i, s in enumerate(self.stages) if s.lam > 0), None)
        start = 0
        for index, stage in enumerate(self.stages):
            if step <= stage.end_step:
                if warmup is None or index <= warmup:
                    return stage.lam  # plain training, then the constant warm-up
                previous = self.stages[index - 1].lam
                return previous + sine_eta(step, start, stage.end_step) * (stage.lam - previous)
            start = stage.end_step
        return self.stages[-1].lam

    def describe(self) -> list[dict]:
        """The stages as plain mappings (for configs and logs)."""
        return [{"lambda": s.lam, "end_step": s.end_step} for s in self.stages]


def sine_eta(step: int, start: int, end: int) -> float:
    """ProSparse's eta: 0.5 * (sin(-pi/2 + pi * (t - T_{i-1}) / (T_i - T_{i-1})) + 1), in [0, 1]."""
    fraction = min(max((step - start) / (end - start), 0.0), 1.0)
    return 0.5 * (math.sin(-math.pi / 2 + math.pi * fraction) + 1.0)


def _float_or_none(text: str):
    try:
        return float(text)
    except ValueError:
        return text
