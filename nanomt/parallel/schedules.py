"""Forward/backward schedules: how one optimizer step's micro-batches flow through the model.

The reference schedule is plain gradient accumulation, no pipelining: for each of the m
micro-batches, forward then backward, gradients summing in .grad. Each micro-batch's loss is
divided by m, so the accumulated gradient is that of the mean loss over the whole batch.
Pipeline schedules (1F1B, interleaved) compute the same gradients in a different order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

MicroBatch = tuple[torch.Tensor, torch.Tensor]


def forward_backward_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                          num_microbatches: int) -> torch.Tensor:
    """One micro-batch: forward, scale the loss by 1/m, backward. Returns the unscaled loss."""
    loss = model(inputs, targets)
    (loss / num_microbatches).backward()
    return loss.detach()


def forward_backward_no_pipelining(model: nn.Module,
                                   micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
    """Gradient accumulation over all micro-batches. Returns the sum of their mean losses."""
    num_microbatches = len(micro_batches)
    loss_sum = torch.zeros(())
    for inputs, targets in micro_batches:
        loss_sum = loss_sum + forward_backward_step(model, inputs, targets,
                                                    num_microbatches).cpu()
    return loss_sum


@torch.no_grad()
def forward_only_no_pipelining(model: nn.Module,
                               micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
    """Evaluation: the sum of the micro-batches' mean losses, no gradients."""
    loss_sum = torch.zeros(())
    for inputs, targets in micro_batches:
        loss_sum = loss_sum + model(inputs, targets).float().cpu()
    return loss_sum
