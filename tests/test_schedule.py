"""lambda(step) follows ProSparse's Algorithm 1 (docs/method.md, section 2)."""

import math

import pytest

from relufy.errors import RecipeError
from relufy.schedule import Schedule

# The paper's Llama-2-7B schedule.
PAPER_7B = [
    {"lambda": 0.0, "end_step": 5000},
    {"lambda": 5e-3, "end_step": 6000},
    {"lambda": 5e-2, "end_step": 10000},
    {"lambda": 5e-2, "end_step": 12000},
    {"lambda": 2e-1, "end_step": 16000},
    {"lambda": 2e-1, "end_step": 16500},
]


def eta(t, start, end):
    return 0.5 * (math.sin(-math.pi / 2 + math.pi * (t - start) / (end - start)) + 1)


@pytest.fixture
def paper():
    return Schedule.from_config(PAPER_7B)


@pytest.mark.parametrize("step, expected", [
    (1, 0.0), (5000, 0.0),                                   # stage 0: plain ReLU training
    (5001, 5e-3), (5500, 5e-3), (6000, 5e-3),               # warm-up: constant lambda_1
    (6001, 5e-3 + eta(6001, 6000, 10000) * (5e-2 - 5e-3)),  # incremental: sine from lambda_1
    (7000, 5e-3 + eta(7000, 6000, 10000) * (5e-2 - 5e-3)),
    (8000, 5e-3 + 0.5 * (5e-2 - 5e-3)),                     # halfway: eta = 0.5
    (10000, 5e-2),                                          # reaches lambda_i at T_i
    (11000, 5e-2), (12000, 5e-2),                           # equal neighbours: constant
    (13000, 5e-2 + eta(13000, 12000, 16000) * (2e-1 - 5e-2)),
    (16000, 2e-1), (16250, 2e-1), (16500, 2e-1),
    (20000, 2e-1),                                          # after the last end_step: the last lambda
])
def test_lambda_matches_the_paper_formula(paper, step, expected):
    assert paper.lambda_at(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_rising_schedule_never_decreases(paper):
    values = [paper.lambda_at(t) for t in range(1, 17001, 7)]
    assert all(b >= a - 1e-15 for a, b in zip(values, values[1:]))


def test_first_nonzero_stage_is_a_constant_warmup_even_without_leading_zero():
    schedule = Schedule.from_config([{"lambda": 0.01, "end_step": 10}, {"lambda": 0.03, "end_step": 20}])
    assert [schedule.lambda_at(t) for t in (1, 5, 10)] == [0.01, 0.01, 0.01]
    assert schedule.lambda_at(15) == pytest.approx(0.02)


def test_a_falling_stage_descends_along_the_sine():
    schedule = Schedule.from_config([{"lambda": 0.1, "end_step": 10}, {"lambda": 0.0, "end_step": 20}])
    assert schedule.lambda_at(15) == pytest.approx(0.05)
    assert schedule.lambda_at(20) == 0.0


def test_empty_schedule_is_plain_training():
    assert Schedule.from_config([]).lambda_at(100) == 0.0


@pytest.mark.parametrize("stages, message", [
    ([{"lambda": 0.1, "end_step": 10}, {"lambda": 0.2, "end_step": 5}], "greater than the previous"),
    ([{"lambda": 0.1, "end_step": 10}, {"lambda": 0.2, "end_step": 10}], "greater than the previous"),
    ([{"lambda": -0.1, "end_step": 10}], ">= 0"),
    ([{"lambda": float("nan"), "end_step": 10}], "finite"),
    ([{"lambda": "lots", "end_step": 10}], "finite number"),
    ([{"lambda": 0.1, "end_step": 2.5}], "integer"),
    ([{"lambda": 0.1, "end_step": 0}], "greater than"),
    ([{"lambda": 0.1}], "lacks 'end_step'"),
    ([{"lambda": 0.1, "end_step": 5, "lr": 1}], "unknown key"),
    ([0.1], "must be a mapping"),
])
def test_invalid_stages_are_refused_with_the_entry_named(stages, message):
    with pytest.raises(RecipeError, match=message) as info:
        Schedule.from_config(stages)
    assert "stages[" in str(info.value)
