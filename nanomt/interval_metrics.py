"""A training step's metrics kept on the device until a logging step reads them
(logging.metrics_interval).

Reading a value on the host (`.tolist()`, `float(t)`) waits until the device has run everything
queued before it: the host then has nothing queued ahead, and the device idles while the next
step's kernels are launched. With logging.metrics_interval = N > 1 a step that logs nothing
reads nothing. The optimizer skips an inf/nan step on the device (nanomt.optim.sharded_adamw),
and the step's loss, gradient norm and inf/nan verdict are added to a few device tensors here.
A logging step reads them in its one host sync, with its own values, and its record carries
the interval's aggregates, as Megatron's averaged log does:

    loss_mean            mean loss over the interval's steps whose update was applied (not
                         skipped); nan when every one was skipped
    interval_steps       the steps the record covers: since the previous record of this launch
    skipped_in_interval  updates skipped (inf/nan) among them
    step_time_s          the interval's wall time / its steps (set by the trainer): without a
                         sync a step's own wall time is only the time to launch its kernels

bf16/fp32 stop after train.max_skipped_steps non-finite steps in a row (nanomt.train's
check_finite). The run of non-finite steps is counted here, and the first step that went past
the limit is remembered: the stop fires at the first logging step after it, at most N - 1 steps
later, and names that step. fp16's loss scaler (nanomt.optim.loss_scaler) keeps its scale and
its own stop (overflows at the minimum scale) on the device: a logging step reads them in the
same copy, the record logs that scale, and the stop fires there, naming its step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nanomt.optim.loss_scaler import DynamicLossScaler


@dataclass
class IntervalRead:
    """What a logging step's one host read brings: its own values and the interval's."""

    loss: float
    sum_of_squares: float      # of this step's gradient (the norm is its root)
    skipped: bool              # this step's update was skipped (inf/nan)
    loss_mean: float
    steps: int                 # in the interval, this one included
    skipped_in_interval: int
    over_limit_at: int         # first step past the non-finite limit (0: none yet)
    loss_scale: float          # fp16: the next step's loss scale (else 1.0)
    along: list[float]         # the caller's values (the largest peak memory, say)


class IntervalMetrics:
    """The device-side sums of the steps since the last logging step (module docstring)."""

    def __init__(self, device: torch.device, max_nonfinite_in_a_row: int | None,
                 loss_scaler: DynamicLossScaler | None = None):
        def zero(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros((), dtype=dtype, device=device)

        self.limit = max_nonfinite_in_a_row  # None: no limit (fp16: the loss scaler's business)
        self.nonfinite_in_a_row = zero(torch.int64)  # runs on across intervals
        self.over_limit_at = zero(torch.int64)
        self.loss_sum, self.applied, self.skipped = zero(torch.float64), zero(torch.int64), \
            zero(torch.int64)
        self.loss_scaler = loss_scaler  # fp16: its scale and stop are read with the sums
        self.steps, self.started, self.last_step = 0, None, 0
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def start_step(self) -> None:
        """Call as a step begins: the interval's clock starts with its first step."""
        if self.started is None:
            self.started = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, sum_of_squares: torch.Tensor,
            skipped: torch.Tensor) -> None:
        """Fold in step `step` (1-based): its mean loss [1], ||g||^2 and skip verdict, all on
        the device. Launches a few scalar kernels; reads nothing."""
        loss = loss.reshape(()).double()
        applied = ~skipped
        self.loss_sum += torch.where(applied, loss, 0.0)
        self.applied += applied
        self.skipped += skipped
        # the rule of check_finite: the loss or the gradient norm is not finite
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(sum_of_squares))
        self.nonfinite_in_a_row = torch.where(nonfinite, self.nonfinite_in_a_row + 1, 0)
        if self.limit is not None:
            first = (self.nonfinite_in_a_row > self.limit) & (self.over_limit_at == 0)
            self.over_limit_at = torch.where(first, step, self.over_limit_at)
        self.steps, self.last_step = self.steps + 1, step
        self.last = (loss, sum_of_squares, skipped)

    def read(self, along: torch.Tensor | None = None) -> IntervalRead:
        """The one host sync: the last step's values, the interval's sums and `along`, in one
        copy. The interval's sums restart (the run of non-finite steps does not). fp16: raises
        FloatingPointError if the loss scaler has met its stop (DynamicLossScaler.check)."""
        loss, sum_of_squares, skipped = self.last
        scaler = self.loss_scaler
        extra = along.reshape(-1).double() if along is not None else loss.new_empty(0)
        scaler_state = [scaler.scale, scaler.failed_at.double()] if scaler is not None else []
        values = torch.cat([torch.stack([loss, sum_of_squares.double(), skipped.double(),
                                         self.loss_sum, self.applied.double(),
                                         self.skipped.double(), self.over_limit_at.double(),
                                         *scaler_state]), extra]).tolist()
        loss_v, squares, skipped_v, loss_sum, applied, skipped_n, over_at, *rest = values
        scale = 1.0
        if scaler is not None:  # its two values come before `along`'s
            scale, failed_at, *rest = rest
            scaler.check(int(failed_at), self.last_step)
        read = IntervalRead(loss_v, squares, bool(skipped_v),
                            loss_sum / applied if applied else float("nan"), self.steps,
                            int(skipped_n), int(over_at), scale, rest)
        for total in (self.loss_sum, self.applied, self.skipped):
            total.zero_()
        self.steps = 0
        return read

    def restart_clock(self) -> float:
        """Seconds since the interval's first step began; the next step starts a new one."""
        elapsed = time.perf_counter() - self.started
        self.started = None
        return elapsed
