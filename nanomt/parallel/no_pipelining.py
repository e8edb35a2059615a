"""Forward/backward without pipelining: gradient accumulation over the micro-batches.

The reference schedule is plain gradient accumulation, no pipelining: for each of the m
micro-batches, forward then backward, gradients summing in .grad. Each micro-batch's loss is
divided by m, so the accumulated gradient is that of the mean loss over the whole batch.
Pipeline schedules (GPipe, 1F1B, interleaved 1F1B; nanomt.parallel.pipeline) compute the same
gradients in a different order, over model chunks held by different ranks.

Every schedule is called the same way (nanomt.parallel.forward_backward picks one for a layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.pipeline.timeline import Timeline

MicroBatch = tuple[torch.Tensor, torch.Tensor]


def forward_backward_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                          num_microbatches: int, loss_scale: float | torch.Tensor = 1.0
                          ) -> torch.Tensor:
    """One micro-batch: forward, scale the loss by S/m (S: fp16's loss scale, a device scalar;
    else 1), backward. Returns the unscaled loss."""
    loss = model(inputs, targets)
    (loss * loss_scale / num_microbatches).backward()
    return loss.detach()


def forward_backward_no_pipelining(model: nn.Module, micro_batches: Sequence[MicroBatch],
                                   loss_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Gradient accumulation over all micro-batches. Returns the sum of their mean losses."""
    num_microbatches = len(micro_batches)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for inputs, targets in micro_batches:
        loss_sum = loss_sum + forward_backward_step(model, inputs, targets, num_microbatches,
                                                    loss_scale).float()
    return loss_sum


@torch.no_grad()
def forward_only_no_pipelining(model: nn.Module,
                               micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
    """Evaluation: the sum of the micro-batches' mean losses, no gradients."""
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for inputs, targets in micro_batches:
        loss_sum = loss_sum + model(inputs, targets).float()
    return loss_sum


def forward_backward_without_pipeline(model_chunks: Sequence[nn.Module],
                                      micro_batches: Sequence[MicroBatch],
                                      grid: ParallelGrid | None = None, *,
                                      forward_only: bool = False,
                                      timeline: Timeline | None = None,
                                      loss_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The no-pipelining schedule behind the common signature (one chunk, one stage)."""
    if len(model_chunks) != 1:
        raise ValueError(f"without pipelining a rank holds one model chunk, got "
                         f"{len(model_chunks)}; set parallel.virtual_stages=1")
    if forward_only:
        return forward_only_no_pipelining(model_chunks[0], micro_batches)
    return forward_backward_no_pipelining(model_chunks[0], micro_batches, loss_scale)
