"""Forward/backward without pipelining, and the choice of schedule for a layout.

The reference schedule is plain gradient accumulation, no pipelining: for each of the m
micro-batches, forward then backward, gradients summing in .grad. Each micro-batch's loss is
divided by m, so the accumulated gradient is that of the mean loss over the whole batch.
Pipeline schedules (GPipe, 1F1B, interleaved 1F1B; nanomt.parallel.pipeline) compute the same
gradients in a different order, over model chunks held by different ranks.

`get_forward_backward_func(layout)` picks the schedule for a layout, as Megatron's function of
the same name: every schedule is called the same way, fn(model_chunks, micro_batches, grid,
forward_only=..., timeline=...), and returns the sum of the micro-batch losses (on the last
pipeline stage; zero elsewhere) as a tensor on the model's device: no host sync per
micro-batch; the caller syncs once per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.pipeline.engine import forward_backward_pipelining
from nanomt.parallel.pipeline.timeline import Timeline

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
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for inputs, targets in micro_batches:
        loss_sum = loss_sum + forward_backward_step(model, inputs, targets,
                                                    num_microbatches).float()
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
                                      timeline: Timeline | None = None) -> torch.Tensor:
    """The no-pipelining schedule behind the common signature (one chunk, one stage)."""
    if len(model_chunks) != 1:
        raise ValueError(f"without pipelining a rank holds one model chunk, got "
                         f"{len(model_chunks)}; set parallel.virtual_stages=1")
    if forward_only:
        return forward_only_no_pipelining(model_chunks[0], micro_batches)
    return forward_backward_no_pipelining(model_chunks[0], micro_batches)


def get_forward_backward_func(layout, schedule: str = "1f1b") -> Callable[..., torch.Tensor]:
    """The schedule for `layout` (anything with .pp and .virtual_stages): no pipelining when
    pp == 1, else `schedule` ("1f1b": 1F1B, interleaved when virtual_stages > 1; "gpipe")."""
    if layout.pp == 1:
        return forward_backward_without_pipeline
    return functools.partial(forward_backward_pipelining, schedule=schedule)
