"""What a training step reads from the device, and a metrics record every
logging.metrics_interval steps.

Every step reads the device once, after clipping (`StepRead`: the loss, the gradient norm and
the inf/nan verdict, the largest peak memory and the preemption flag, fp16's loss scale, in one
copy): the verdict decides on the host, the same on every rank, whether the optimizer updates,
as Megatron reads found_inf every step. With logging.metrics_interval = N > 1 only every N-th
step (and the steps with a reason to: evaluation, a checkpoint, train.exit_after, the last step)
writes a record, which carries its interval's aggregates, as Megatron's averaged log does:

    loss_mean            mean loss over the interval's steps whose update was applied (not
                         skipped); nan when every one was skipped
    interval_steps       the steps the record covers: since the previous record of this launch
    skipped_in_interval  updates skipped (inf/nan) among them
    step_time_s          the interval's wall time / its steps
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanomt.errors import RanksDisagree
from nanomt.metrics import max_over_ranks, peak_memory_bytes
from nanomt.optim.grad_norm import read_norm

if TYPE_CHECKING:
    from nanomt.optim.loss_scaler import DynamicLossScaler
    from nanomt.parallel.grid import ParallelGrid


@dataclass
class StepRead:
    """A step's values on the host, from its one read."""

    loss: float
    grad_norm: float           # before clipping; inf/nan when some rank's gradient is
    skipped: bool              # the update was skipped (an inf/nan gradient on some rank)
    loss_scale: float          # fp16: the next step's loss scale (else 1.0)
    peak_memory: int           # bytes this process has held at most
    peak_memory_max: float     # the same, the largest over every rank
    preempted: bool            # some rank got the preemption signal


def read_step(step: int, totals: torch.Tensor, loss: torch.Tensor, grid: ParallelGrid,
              device: torch.device, preemption_signal: bool, scaler: DynamicLossScaler | None
              ) -> StepRead:
    """Step `step`'s (1-based) one host sync: the gradient norm and the inf/nan verdict
    (nanomt.optim.grad_norm's totals), the loss [1], the peak memory and the preemption flag,
    each the largest over every rank (one all-reduce: a signal on any rank stops all), and
    fp16's next loss scale and stop, in one copy. fp16: raises FloatingPointError if the loss
    scaler has met its stop (DynamicLossScaler.check)."""
    peak_memory = peak_memory_bytes(device)  # the process's peak: never lower
    decisions = collective_decisions(totals, loss, scaler)
    largest = max_over_ranks([peak_memory, float(preemption_signal)], grid, device,
                             torch.cat([decisions, -decisions]))
    along = [loss.reshape(-1).double(), largest]
    if scaler is not None:
        along.append(torch.stack([scaler.scale, scaler.failed_at.double()]))
    grad_norm, skipped, values = read_norm(totals, torch.cat(along))
    loss_value, peak_max, signal, *rest = values
    n = decisions.numel()
    check_agreement(step, rest[:n], [-v for v in rest[n:2 * n]])
    fp16 = rest[2 * n:]
    if scaler is not None:
        scaler.check(int(fp16[1]), step)
    return StepRead(loss_value, grad_norm, skipped, fp16[0] if fp16 else 1.0, peak_memory,
                    peak_max, signal > 0)


# What every rank must decide alike, or the ranks' next collectives differ (a crash or, on NCCL,
# a hang): each travels in the step's all-reduce as (d, -d) under MAX, i.e. the largest and the
# smallest over the ranks, which must be equal. The preemption flag needs no check: it is the
# maximum by design; checkpoint verdicts are broadcast (nanomt.checkpoint).
DECISIONS = ("skip the update (inf/nan gradient)", "count a non-finite step (loss or norm)")


def collective_decisions(totals: torch.Tensor, loss: torch.Tensor,
                         scaler: DynamicLossScaler | None) -> torch.Tensor:
    """This rank's DECISIONS (and fp16's next loss scale) as a float64 tensor on the device."""
    skip = ~torch.isfinite(totals).all()
    values = [skip, skip | ~torch.isfinite(loss.reshape(()))]
    if scaler is not None:
        values.append(scaler.scale)
    return torch.stack([v.double() for v in values])


def check_agreement(step: int, largest: list[float], smallest: list[float]) -> None:
    """Raise RanksDisagree naming each decision whose largest and smallest value differ."""
    names = DECISIONS + ("the next fp16 loss scale",)
    split = [f"{name}: from {lo:g} to {hi:g}"
             for name, hi, lo in zip(names, largest, smallest) if hi != lo]
    if split:
        raise RanksDisagree(f"step {step}: the ranks disagree on " + "; ".join(split)
                            + " (a decision that must be collective: a bug in nanomt)")


class IntervalLog:
    """The host's sums over the steps since the last record (module docstring)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self._restart()

    def _restart(self) -> None:
        self.steps = self.applied = self.skipped = 0
        self.loss_sum = 0.0

    def start_step(self) -> None:
        """Call as a step begins: the interval's clock starts with its first step."""
        if self.started is None:
            self.started = time.perf_counter()

    def add(self, read: StepRead) -> None:
        self.steps += 1
        self.skipped += read.skipped
        if not read.skipped:
            self.applied += 1
            self.loss_sum += read.loss

    def close(self) -> dict:
        """The interval's aggregates for a record; the next step starts a new interval."""
        elapsed = time.perf_counter() - self.started
        aggregates = {"interval_steps": self.steps,
                      "loss_mean": self.loss_sum / self.applied if self.applied else float("nan"),
                      "skipped_in_interval": self.skipped,
                      "step_time_s": elapsed / self.steps}
        self.started = None
        self._restart()
        return aggregates
