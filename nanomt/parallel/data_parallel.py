"""Plain data parallelism: average the gradients over the dp group once per optimizer step.

Every dp rank computes the gradient of its slice of the global batch; the mean over ranks is the
gradient of the whole batch (equal micro-batch sizes). All gradients are flattened into one
buffer so the reduction is one collective, not one per tensor.
"""

from __future__ import annotations

import torch

from nanomt.parallel import comm


def allreduce_gradients(params: list[torch.nn.Parameter], dp_group) -> None:
    """grad <- mean over the dp group of grad, for every parameter that has one."""
    dp = comm.group_size(dp_group)
    if dp == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, dp_group).div_(dp)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
