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


def forward_backward_no_pipelining(model_chunks: Sequence[nn.Module],
                                   micro_batches: Sequence[MicroBatch],
                                   grid: ParallelGrid | None = None, *,
                                   forward_only: bool = False,
                                   timeline: Timeline | None = None,
                                   loss_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """For each micro-batch: forward, then backward from S * loss / m (S: fp16's loss scale, a
    device scalar; else 1). Returns the sum of the micro-batches' mean losses. One chunk, one
    stage: `grid` and `timeline` are unused (the common signature)."""
    if len(model_chunks) != 1:
        raise ValueError(f"without pipelining a rank holds one model chunk, got "
                         f"{len(model_chunks)}; set parallel.virtual_stages=1")
    model, num_microbatches = model_chunks[0], len(micro_batches)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for inputs, targets in micro_batches:
        with torch.set_grad_enabled(not forward_only):
            loss = model(inputs, targets)
        if not forward_only:
            (loss * loss_scale / num_microbatches).backward()
        loss_sum = loss_sum + loss.detach().float()
    return loss_sum
