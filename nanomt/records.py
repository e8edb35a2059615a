"""The metrics records of a run: which steps write one, what it holds, and the stop after too
many non-finite steps in a row.

A step writes a record every logging.metrics_interval-th step and on the steps that have a
reason to (evaluation, a checkpoint, train.exit_after, the last step, a stop, a preemption).
A record holds the step's values (its one read, nanomt.interval_metrics.StepRead), the
interval's aggregates since the previous record (IntervalLog) and its throughput (MFU from
nanomt.flops).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from nanomt.errors import NonFiniteError
from nanomt.flops import flops_per_iteration, hardware_flops_per_iteration
from nanomt.interval_metrics import IntervalLog, StepRead
from nanomt.metrics import throughput

if TYPE_CHECKING:
    from nanomt.checkpoint.checkpointer import Checkpointer
    from nanomt.data import GlobalBatchSampler
    from nanomt.model import ModelConfig


class StepRecords:
    """The host-side bookkeeping between steps: records, skips, the non-finite run."""

    def __init__(self, cfg: DictConfig, model_cfg: ModelConfig, world_size: int,
                 peak_tflops: float | None) -> None:
        self.cfg, self.model_cfg, self.world_size = cfg, model_cfg, world_size
        G, recompute = cfg.train.global_batch_size, str(cfg.train.activation_checkpointing)
        self.flops_per_step = flops_per_iteration(model_cfg, G)
        self.hardware_flops_per_step = hardware_flops_per_iteration(model_cfg, G, recompute)
        self.peak_tflops = peak_tflops  # per device, for MFU (logging.peak_tflops or known GPUs)
        self.interval = IntervalLog()  # sums between records
        self.skipped_steps = 0         # updates skipped so far in this launch (inf/nan)
        self.nonfinite_in_a_row = 0    # steps in a row whose loss or gradient norm was not finite
        self.over_limit_at: int | None = None  # the step past train.max_skipped_steps of them

    def logs_at(self, steps_done: int, checkpointer: Checkpointer) -> bool:
        """Whether step `steps_done` (1-based) writes a record for a reason known in advance:
        every logging.metrics_interval-th step, evaluation, a checkpoint, the last step."""
        c = self.cfg.train
        every = int(self.cfg.logging.get("metrics_interval", 1))
        return (steps_done % every == 0 or steps_done == int(c.steps)
                or bool(c.eval_interval and steps_done % int(c.eval_interval) == 0)
                or checkpointer.save_due(steps_done))

    def after_step(self, step: int, read: StepRead, lr: float, data: GlobalBatchSampler,
                   checkpointer: Checkpointer) -> dict | None:
        """Count step `step` (0-based); its record, or None on a step that writes none."""
        self.count_nonfinite(step, read)
        self.interval.add(read)
        if not (self.logs_at(step + 1, checkpointer) or self.over_limit_at is not None
                or read.preempted):
            return None
        return self.record(step, read, lr, data)

    def count_nonfinite(self, step: int, read: StepRead) -> None:
        """bf16/fp32: the run of steps whose loss or gradient norm is not finite; past
        train.max_skipped_steps in a row, `over_limit_at` names the step (check_finite stops
        the run after its record). fp16's loss scaler has a stop of its own."""
        self.skipped_steps += read.skipped
        finite = math.isfinite(read.loss) and math.isfinite(read.grad_norm)
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        c = self.cfg.train
        if c.precision != "fp16" and self.nonfinite_in_a_row > int(c.max_skipped_steps):
            self.over_limit_at = step + 1

    def record(self, step: int, read: StepRead, lr: float, data: GlobalBatchSampler) -> dict:
        """A record (nanomt.metrics): the step's loss, optimizer state, memory (bytes: this
        rank's peak, the largest), its interval's mean loss, skips and throughput."""
        consumed = data.consumed_before(step + 1)
        interval = self.interval.close()
        steps = interval["interval_steps"]
        first = step + 1 - steps  # the interval's first step, 0-based
        mean_batch = (consumed - data.consumed_before(first)) / steps
        share = mean_batch / self.cfg.train.global_batch_size  # of the FLOPs, during a ramp-up
        seq_len = self.model_cfg.seq_len
        return {"step": step + 1, "loss": read.loss, "lr": lr, "grad_norm": read.grad_norm,
                "loss_scale": read.loss_scale, "skipped": read.skipped,
                "skipped_steps": self.skipped_steps, "global_batch_size": data.batch_size(step),
                "consumed_samples": consumed, "tokens": consumed * seq_len,
                **interval,
                **throughput(interval["step_time_s"], mean_batch, seq_len,
                             self.flops_per_step * share, self.hardware_flops_per_step * share,
                             self.world_size, self.peak_tflops),
                "peak_memory_gb": read.peak_memory / 2**30,
                "peak_memory_gb_max_rank": read.peak_memory_max / 2**30}

    def check_finite(self, record: dict, last_good: str | None) -> None:
        """bf16/fp32 have no loss scale to lower: a non-finite loss or gradient norm skips the
        update (the optimizer already did) and, past train.max_skipped_steps in a row, stops
        every rank at once (they all hold the same global loss and norm) without saving."""
        if self.over_limit_at is None:
            return  # fp16 never sets it: its loss scaler skips, lowers the scale, stops
        in_a_row = int(self.cfg.train.max_skipped_steps) + 1
        raise NonFiniteError(
            f"step {record['step']}: loss {record['loss']} or gradient norm "
            f"{record['grad_norm']} is not finite ({in_a_row} such steps in a row); the update "
            f"was skipped and nothing was saved (last good checkpoint: {last_good or 'none'}); "
            f"lower optim.lr, check the data, or allow skips with train.max_skipped_steps")
