"""Which schedule runs a step's forward and backward passes, for a layout.

`get_forward_backward_func(layout)`, as Megatron's function of the same name: plain gradient
accumulation without pipelining (nanomt.parallel.no_pipelining) when pp == 1, else a pipeline
schedule (nanomt.parallel.pipeline: GPipe, 1F1B, interleaved 1F1B when virtual_stages > 1),
or a zero-bubble one, whose passes the engine runs with the layer's step (ZB-H1 and ZB-V:
nanomt.parallel.pipeline.zero_bubble_step).
Every schedule is called the same way,

    loss_sum = fn(model_chunks, micro_batches, grid, forward_only=..., timeline=...,
                  loss_scale=...)

and returns the sum of the micro-batch losses (on the last pipeline stage; zero elsewhere) as a
tensor on the model's device: no host sync per micro-batch; the caller syncs once per step.
Backward starts from loss_scale * loss / m (fp16's loss scale: a device scalar, so that no
schedule reads it on the host; else 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from nanomt.parallel.no_pipelining import forward_backward_no_pipelining
from nanomt.parallel.pipeline.engine import forward_backward_pipelining
from nanomt.parallel.pipeline.posting import checked_plans
from nanomt.parallel.pipeline.zero_bubble_step import ZeroBubbleStep, ZeroBubbleVStep

# schedule -> the engine step that runs its B and W passes
ZERO_BUBBLE_STEPS = {"zb_h1": ZeroBubbleStep, "zbv": ZeroBubbleVStep}


def get_forward_backward_func(layout, schedule: str = "1f1b") -> Callable[..., torch.Tensor]:
    """The schedule for `layout` (anything with .pp and .virtual_stages): no pipelining when
    pp == 1, else `schedule` ("1f1b": 1F1B, interleaved when virtual_stages > 1; "gpipe";
    "zb_h1"; "zbv")."""
    if layout.pp == 1:
        return forward_backward_no_pipelining
    return functools.partial(forward_backward_pipelining, schedule=schedule,
                             step_type=ZERO_BUBBLE_STEPS.get(schedule))


def check_schedule_plans(schedule: str, pp: int, num_microbatches: int, v: int) -> None:
    """The posting check (docs/pipeline.md) of the training and the evaluation schedule, at
    start-up rather than at step 1 (the plans are cached): a plan that would deadlock on NCCL
    raises ValueError. Without pipelining there is no plan."""
    for forward_only in (False, True) if pp > 1 else ():
        checked_plans(schedule, pp, num_microbatches, v, forward_only)
