"""The learning-rate warm-up's first steps against the formula nanomt/optim/schedule.py documents
(Megatron's convention): lr(t) = lr_max * t / T_warm for 0-based t < T_warm, so the first step
runs at 0 and lr_max is reached exactly once, at t = T_warm, where the cosine begins."""

from __future__ import annotations

import math

import pytest

from nanomt.optim.schedule import WarmupCosine


def documented(t: int, lr_max: float, lr_min: float, warm: int, decay: int) -> float:
    if t < warm:
        return lr_max * t / warm
    if t >= decay:
        return lr_min
    p = (t - warm) / (decay - warm)
    return lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * p)) / 2


@pytest.mark.parametrize("warm", [1, 5])
def test_first_steps_follow_the_documented_formula_and_peak_once(warm):
    lr = WarmupCosine(max_lr=2e-3, min_lr=2e-4, warmup_steps=warm, decay_steps=20)
    values = [lr(t) for t in range(25)]
    assert values == pytest.approx([documented(t, 2e-3, 2e-4, warm, 20) for t in range(25)],
                                   rel=1e-12, abs=0)
    assert values[0] == 0.0
    assert values[:warm + 1] == pytest.approx([2e-3 * t / warm for t in range(warm + 1)])
    assert values.count(max(values)) == 1 and values.index(max(values)) == warm
    assert values[warm + 1] < 2e-3  # the cosine has begun


def test_no_warmup_starts_at_the_peak():
    lr = WarmupCosine(max_lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=4)
    assert [lr(t) for t in range(5)] == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4),
                                                       0.5, 0.5 - 0.5 * math.cos(math.pi / 4),
                                                       0.0], abs=1e-12)
