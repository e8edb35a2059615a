"""What a training step reads from the device: once, after clipping, in one copy.

`StepRead` holds the loss, the gradient norm and the inf/nan verdict, the largest peak memory
and the preemption flag (both maxima over every rank, one all-reduce), and fp16's next loss
scale, and any values to be summed over every rank on the way (a mixture of experts' router
statistics: nanomt.model.moe.step_statistics). The verdict decides on the host, the same on every rank, whether the optimizer updates,
as Megatron reads found_inf every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanomt.metrics import max_over_ranks, peak_memory_bytes
from nanomt.optim.grad_norm import read_norm
from nanomt.parallel import comm
from nanomt.rank_agreement import check_agreement, collective_decisions

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
    summed: list[float] | None = None  # read_step's `summed`, summed over every rank


def read_step(step: int, totals: torch.Tensor, loss: torch.Tensor, grid: ParallelGrid,
              device: torch.device, preemption_signal: bool, scaler: DynamicLossScaler | None,
              summed: torch.Tensor | None = None) -> StepRead:
    """Step `step`'s (1-based) one host sync: the gradient norm and the inf/nan verdict
    (nanomt.optim.grad_norm's totals), the loss [1], the peak memory and the preemption flag,
    each the largest over every rank (one all-reduce: a signal on any rank stops all), and
    fp16's next loss scale and stop, in one copy. fp16: raises FloatingPointError if the loss
    scaler has met its stop (DynamicLossScaler.check). `summed` (on the device, equal over
    tp; zero on pipeline stages without a share) is summed over the pp stages and the dp x cp
    ranks and read along: two small all-reduces, no extra host sync."""
    peak_memory = peak_memory_bytes(device)  # the process's peak: never lower
    decisions = collective_decisions(totals, loss, scaler)
    largest = max_over_ranks([peak_memory, float(preemption_signal)], grid, device,
                             torch.cat([decisions, -decisions]))
    along = [loss.reshape(-1).double(), largest]
    if scaler is not None:
        along.append(torch.stack([scaler.scale, scaler.failed_at.double()]))
    if summed is not None:
        comm.all_reduce(summed, grid.pp_group)
        comm.all_reduce(summed, grid.grad_sync_group)
        along.append(summed.reshape(-1).double())
    grad_norm, skipped, values = read_norm(totals, torch.cat(along))
    loss_value, peak_max, signal, *rest = values
    n = decisions.numel()
    check_agreement(step, rest[:n], [-v for v in rest[n:2 * n]])
    fp16 = rest[2 * n:2 * n + 2] if scaler is not None else []
    if scaler is not None:
        scaler.check(int(fp16[1]), step)
    sums = rest[2 * n + len(fp16):] if summed is not None else None
    return StepRead(loss_value, grad_norm, skipped, fp16[0] if fp16 else 1.0, peak_memory,
                    peak_max, signal > 0, sums)
