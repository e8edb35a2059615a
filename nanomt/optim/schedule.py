"""Learning-rate schedule of GPT-3 and MT-NLG: linear warm-up, then cosine decay to a floor.

    lr(t) = lr_max * t / T_warm                                  for t < T_warm
    lr(t) = lr_min + (lr_max - lr_min) * (1 + cos(pi * p)) / 2   for T_warm <= t < T_decay
            with p = (t - T_warm) / (T_decay - T_warm)
    lr(t) = lr_min                                               for t >= T_decay

t counts from 0 (the first optimizer step), as in Megatron's scheduler: the first step runs at
lr 0, the warm-up climbs by lr_max / T_warm a step, and lr_max is reached once, at t = T_warm,
where the cosine starts (T_warm = 0: no warm-up, the first step runs at lr_max).

MT-NLG: lr_max 5e-5, warm-up over 1B tokens, cosine decay to 10% (lr_min = lr_max / 10).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

from nanomt.config_rules import SCHEDULE_UNITS


def check_floor(max_lr: float, min_lr: float) -> None:
    """The schedule decays to its floor, so the floor is at most the peak ("what: fix"; the
    field ranges, warm-up >= 0 and decay >= 1, are the config's: nanomt.config)."""
    if min_lr > max_lr:
        raise ValueError(f"optim.min_lr ({min_lr}) exceeds optim.lr ({max_lr}): lower "
                         f"optim.min_lr or raise optim.lr")


@dataclass(frozen=True)
class WarmupCosine:
    max_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int

    def __post_init__(self) -> None:
        check_floor(self.max_lr, self.min_lr)

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        if step >= self.decay_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        return self.min_lr + (self.max_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate_at(o: DictConfig, steps: int, consumed_before: Callable[[int], int],
                     seq_len: int) -> Callable[[int], float]:
    """The run's lr(step) from the `optim` config: the schedule counts steps, samples or tokens
    (optim.schedule_unit; with a ramp-up, samples and tokens keep warm-up and decay the same
    amount of data); decay ends at optim.decay_steps, else at the run's last step."""
    position = schedule_position(str(o.get("schedule_unit", "steps")), consumed_before, seq_len)
    curve = WarmupCosine(o.lr, o.min_lr, o.warmup_steps, o.decay_steps or position(steps))
    return lambda step: curve(position(step))


def schedule_position(unit: str, consumed_before: Callable[[int], int], seq_len: int
                      ) -> Callable[[int], int]:
    """Where step t stands on the learning-rate schedule's axis (optim.schedule_unit): the step
    itself, the samples consumed before it, or those samples' tokens. Counted in samples or
    tokens, warm-up and decay mean the same amount of data with or without a ramp-up."""
    if unit == "steps":
        return lambda step: step
    if unit == "samples":
        return consumed_before
    if unit == "tokens":
        return lambda step: consumed_before(step) * seq_len
    raise ValueError(f"optim.schedule_unit must be one of {SCHEDULE_UNITS}, got {unit!r}")
