"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import itertools
import math

import pytest

from genloop.train.schedule import lr_at

LR, MIN_LR, WARMUP, MAX = 1e-3, 1e-4, 10, 110


def lrs(schedule: str, **kw: float) -> list[float]:
    spec = {"lr": LR, "min_lr": MIN_LR, "warmup_steps": WARMUP, "max_steps": MAX} | kw
    return [lr_at(step, schedule=schedule, **spec) for step in range(MAX)]  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_to_the_peak(schedule: str) -> None:
    values = lrs(schedule)
    # step s (0-based) of the warmup trains at lr·(s+1)/warmup: never 0, the peak at its end
    assert values[:WARMUP] == pytest.approx([LR * (s + 1) / WARMUP for s in range(WARMUP)])
    assert values[WARMUP] == pytest.approx(LR)


def test_cosine_decays_from_the_peak_to_min_lr() -> None:
    values = lrs("cosine")[WARMUP:]
    span = MAX - WARMUP
    assert all(a >= b for a, b in itertools.pairwise(values))  # never rises
    assert values[span // 2] == pytest.approx((LR + MIN_LR) / 2)  # half way: the mean
    for i, value in enumerate(values):
        expected = MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * i / span))
        assert value == pytest.approx(expected)
    assert values[-1] > MIN_LR  # the last step trains just above it ...
    # ... which it reaches at max_steps, and stays at beyond (a run resumed with more steps)
    assert lr_at(MAX, lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, max_steps=MAX) == MIN_LR
    assert lr_at(MAX * 2, lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, max_steps=MAX) == MIN_LR


def test_linear_decays_in_equal_steps() -> None:
    values = lrs("linear")[WARMUP:]
    step = (LR - MIN_LR) / (MAX - WARMUP)
    assert [a - b for a, b in itertools.pairwise(values)] == pytest.approx(
        [step] * (len(values) - 1)
    )
    assert values[0] == pytest.approx(LR)
    assert lr_at(
        MAX, lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, max_steps=MAX, schedule="linear"
    ) == (pytest.approx(MIN_LR))


def test_constant_holds_the_peak_after_warmup() -> None:
    assert lrs("constant")[WARMUP:] == [LR] * (MAX - WARMUP)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_no_warmup_starts_at_the_peak(schedule: str) -> None:
    assert lrs(schedule, warmup_steps=0)[0] == LR
