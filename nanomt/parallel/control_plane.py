"""Control-plane collectives: Python objects over the world group, outside the training math.

Checkpoints, data caches, evaluation and the metrics agree on small Python values (paths, step
numbers, per-rank records) with torch's pickling collectives. None of them moves a tensor of the
model, so they live apart from nanomt.parallel.comm (which re-exports them). Without a process
group each is the identity of one rank.
"""

from __future__ import annotations

import torch.distributed as dist

from nanomt.parallel.failures import note_operation


def world_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def broadcast_object(value: object, src: int = 0, group: dist.ProcessGroup | None = None
                     ) -> object:
    """`value` from global rank `src`, on every rank."""
    if not dist.is_initialized():
        return value
    note_operation("broadcast_object", group)
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(value: object, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    note_operation("all_gather_object", group)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, value, group=group)
    return everyone


def gather_object(value: object, dst: int = 0) -> list | None:
    """Every rank's `value` on global rank `dst` (None elsewhere), over the world."""
    if not dist.is_initialized():
        return [value]
    note_operation("gather_object", None)
    everyone = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(value, everyone, dst=dst)
    return everyone
