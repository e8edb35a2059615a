"""Forward/backward without pipelining: gradient accumulation over the micro-batches.

For each of the m micro-batches, forward then backward, gradients summing in .grad; each loss
is divided by m, so the sum is the gradient of the mean loss over the whole batch:

    grad = sum_i d(loss_i / m) / d params

The pipeline schedules (nanomt.parallel.pipeline) compute the same sum in another order, over
model chunks held by different ranks; nanomt.parallel.forward_backward picks one for a layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.pipeline.timeline import Timeline

MicroBatch = tuple[torch.Tensor, torch.Tensor]


def forward_backward_no_pipelining(model_chunks: Sequence[nn.Module],
                                   micro_batches: Sequence[MicroBatch],
                                   grid: ParallelGrid | None = None, *,
                                   forward_only: bool = False,
                                   timeline: Timeline | None = None,
                                   loss_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """For each micro-batch: forward, then backward from S * loss / m (S: fp16's loss scale, a
    device scalar; else 1). Returns the sum of the micro-batches' mean losses. One chunk, one
    stage: `grid` and `timeline` are unused (the common signature)."""
    (model,) = model_chunks  # one chunk: config validation allows virtual_stages > 1 only with pp
    num_microbatches = len(micro_batches)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for inputs, targets in micro_batches:
        with torch.set_grad_enabled(not forward_only):
            loss = model(inputs, targets)
        if not forward_only:
            (loss * loss_scale / num_microbatches).backward()
        loss_sum = loss_sum + loss.detach().float()
    return loss_sum
