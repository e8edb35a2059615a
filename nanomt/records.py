"""The metrics records of a run: which steps write one, what it holds, and the stop after too
many non-finite steps in a row.

A step writes a record every logging.metrics_interval-th step and on the steps that have a
reason to (evaluation, a checkpoint, train.exit_after, the last step, a stop, a preemption).
A record holds the step's values (its one read, nanomt.step_read.StepRead), its throughput
(MFU from nanomt.flops) and the aggregates of its interval, the steps since the previous record
of this launch, as Megatron's averaged log does:

    loss_mean            mean loss over the interval's steps whose update was applied (not
                         skipped); nan when every one was skipped
    interval_steps       the steps the record covers
    skipped_in_interval  updates skipped (inf/nan) among them
    step_time_s          the interval's wall time / its steps

A model with experts adds its step's router statistics (nanomt.model.moe.statistics_record:
moe_aux_loss, moe_z_loss, moe_expert_load/layer_<i>), read with the step's values.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from nanomt.errors import NonFiniteError
from nanomt.flops import flops_per_iteration, hardware_flops_per_iteration, peak_tflops
from nanomt.step_read import StepRead
from nanomt.metrics import throughput
from nanomt.model.moe import statistics_record

if TYPE_CHECKING:
    from nanomt.checkpoint.checkpointer import Checkpointer
    from nanomt.data import GlobalBatchSampler
    from nanomt.model import ModelConfig


class IntervalLog:
    """The host's sums over the steps since the last record (the module docstring's list)."""

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


class StepRecords:
    """The host-side bookkeeping between steps: records, skips, the non-finite run."""

    def __init__(self, cfg: DictConfig, model_cfg: ModelConfig, world_size: int,
                 device: torch.device) -> None:
        self.cfg, self.model_cfg, self.world_size = cfg, model_cfg, world_size
        G, recompute = cfg.train.global_batch_size, str(cfg.train.activation_checkpointing)
        self.flops_per_step = flops_per_iteration(model_cfg, G)
        self.hardware_flops_per_step = hardware_flops_per_iteration(model_cfg, G, recompute)
        # per device, for MFU: logging.peak_tflops, or the card's from nanomt.flops's table
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.peak_tflops = peak_tflops(name, cfg.logging.get("peak_tflops"),
                                       str(cfg.train.precision))
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
                "peak_memory_gb_max_rank": read.peak_memory_max / 2**30,
                **(statistics_record(read.summed, self.model_cfg) if read.summed else {})}

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
