"""Batch-size ramp-up (GPT-3, MT-NLG): the global batch grows with the samples consumed.

`train.rampup_batch_size = [START, INCREMENT, RAMP_SAMPLES]` and `train.global_batch_size = G`
give, with k = (G - START) / INCREMENT increments spread evenly over RAMP_SAMPLES samples,

    B(c) = START + INCREMENT * floor(c / (RAMP_SAMPLES / k))    for c <= RAMP_SAMPLES
    B(c) = G                                                    for c >  RAMP_SAMPLES

where c is the number of samples consumed before the step (Megatron's rampup-batch-size
semantics). MT-NLG: [32, 32, 5,859,375] (12B tokens of 2,048) up to G = 1,920. Step t takes
B(c_t) samples, c_{t+1} = c_t + B(c_t); the ramp's steps are listed once, so the position of
any step is a lookup, and after the ramp c_t grows by G per step.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class BatchSchedule:
    """Global batch size and consumed samples of every step, with or without a ramp-up."""

    def __init__(self, global_batch_size: int, rampup: Sequence[int] | None = None) -> None:
        self.global_batch_size = int(global_batch_size)
        self.rampup = [int(v) for v in rampup] if rampup else None
        # consumed samples before each step of the ramp (c_0 = 0, c_1, ...) and their sizes
        self._starts, self._sizes = [0], []
        if self.rampup is None:
            return
        start, increment, ramp_samples = self.rampup
        check_rampup(start, increment, ramp_samples, self.global_batch_size)
        if start == self.global_batch_size:  # nothing to ramp
            self.rampup = None
            return
        self.per_increment = ramp_samples / ((self.global_batch_size - start) // increment)
        consumed = 0
        while (size := self.batch_size_at(consumed)) < self.global_batch_size:
            self._sizes.append(size)
            consumed += size
            self._starts.append(consumed)

    def batch_size_at(self, consumed: int) -> int:
        """B(c): the global batch of a step that starts after `consumed` samples."""
        if self.rampup is None or consumed > self.rampup[2]:
            return self.global_batch_size
        start, increment, _ = self.rampup
        return min(self.global_batch_size,
                   start + increment * int(consumed / self.per_increment))

    @property
    def ramp_steps(self) -> int:
        """Steps taken at less than the full global batch."""
        return len(self._sizes)

    def consumed_before(self, step: int) -> int:
        """c_step: samples consumed by steps 0 .. step-1."""
        if step <= self.ramp_steps:
            return self._starts[step]
        return self._starts[-1] + (step - self.ramp_steps) * self.global_batch_size

    def batch_size(self, step: int) -> int:
        return self._sizes[step] if step < self.ramp_steps else self.global_batch_size

    def sizes(self) -> list[int]:
        """Every distinct global batch size, in order (START, START + INCREMENT, ..., G)."""
        if self.rampup is None:
            return [self.global_batch_size]
        start, increment, _ = self.rampup
        return list(range(start, self.global_batch_size + 1, increment))


def check_rampup(start: int, increment: int, ramp_samples: int, global_batch_size: int) -> None:
    """START and INCREMENT positive, RAMP_SAMPLES >= 0, G - START a multiple of INCREMENT."""
    if start < 1 or increment < 1 or ramp_samples < 0:
        raise ValueError("train.rampup_batch_size is [START >= 1, INCREMENT >= 1, "
                         f"RAMP_SAMPLES >= 0], got {[start, increment, ramp_samples]}")
    if start > global_batch_size:
        raise ValueError(f"the ramp-up starts at {start}, above train.global_batch_size "
                         f"{global_batch_size}")
    if (global_batch_size - start) % increment:
        raise ValueError(f"train.global_batch_size - START = {global_batch_size} - {start} is "
                         f"not a multiple of INCREMENT = {increment}")


def check_rampup_config(ramp: Sequence[int] | None, global_batch_size: int,
                        micro_batch_size: int, dp: int, pp: int, virtual_stages: int) -> None:
    """For check_config: every global batch size on the ramp splits into micro-batches on every
    replica, and into a multiple of pp of them when interleaving. Raises ConfigError."""
    from nanomt.errors import ConfigError

    if ramp is None:
        return
    key = "train.rampup_batch_size"
    if len(ramp) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in ramp):
        raise ConfigError(f"{key} must be [START, INCREMENT, RAMP_SAMPLES], got {list(ramp)}",
                          f"set {key}")
    try:
        schedule = BatchSchedule(global_batch_size, list(ramp))
    except ValueError as error:
        raise ConfigError(str(error), f"change {key} or train.global_batch_size") from error
    rows = micro_batch_size * dp
    for size in schedule.sizes():
        if size % rows or (virtual_stages > 1 and (size // rows) % pp):
            need = f"micro_batch_size * dp = {rows}" + (
                f" (and {pp} * that, interleaving)" if virtual_stages > 1 else "")
            raise ConfigError(f"{key}: global batch size {size} on the ramp is not divisible "
                              f"by train.{need}",
                              f"change {key}, train.micro_batch_size or parallel.dp")
