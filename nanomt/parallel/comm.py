"""Collectives, in one place, so they can be counted.

Every collective behind the f and g operators of tensor parallelism (Shoeybi et al. 2019, fig. 3:
all-reduce; under sequence parallelism all-gather and reduce-scatter) and behind ZeRO's sharded
data parallelism (Rajbhandari et al. 2020: flat all-gather / reduce-scatter into given buffers)
goes through these few functions. Each is a no-op on a group of one (the single-process model
pays nothing), and each records its kind and element count into `COMM_LOG` while a
`count_collectives()` block is open: that is how the tests check the papers' communication volume
(two all-reduces of b*s*h per layer forward and two backward; ZeRO's 2 or 3 times the parameter
count per step).

`Group` is a process group, or None for a world of one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives (the old names warn); accept either.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

Group = dist.ProcessGroup | None

# (kind, numel) of each collective issued while counting; None when not counting.
COMM_LOG: list[tuple[str, int]] | None = None


@contextlib.contextmanager
def count_collectives() -> Iterator[list[tuple[str, int]]]:
    """Record every collective issued inside the block as (kind, numel of the full tensor)."""
    global COMM_LOG
    previous, COMM_LOG = COMM_LOG, []
    try:
        yield COMM_LOG
    finally:
        COMM_LOG = previous


def _record(kind: str, numel: int) -> None:
    if COMM_LOG is not None:
        COMM_LOG.append((kind, numel))


def group_size(group: Group) -> int:
    """Ranks in `group` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, group: Group,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over `group`; returns the tensor."""
    if group_size(group) == 1:
        return tensor
    _record("all_reduce", tensor.numel())
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_coalesced(tensors: list[torch.Tensor], group: Group) -> None:
    """Sum each of `tensors` over `group` with one all-reduce of their concatenation (all of one
    dtype); the sums are written back in place."""
    if group_size(group) == 1 or not tensors:
        return
    flat = all_reduce(torch.cat([t.reshape(-1) for t in tensors]), group)
    for tensor, summed in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(summed.view_as(tensor))


def all_gather(tensor: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim`, in rank order."""
    world = group_size(group)
    if world == 1:
        return tensor
    moved = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((world * moved.shape[0],) + moved.shape[1:], dtype=moved.dtype,
                      device=moved.device)
    _record("all_gather", out.numel())
    _all_gather_single(out, moved, group=group)
    return out.movedim(0, dim)


def reduce_scatter(tensor: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Sum `tensor` over the group and keep this rank's slice of it along `dim`."""
    world = group_size(group)
    if world == 1:
        return tensor
    moved = tensor.movedim(dim, 0).contiguous()
    if moved.shape[0] % world:
        raise ValueError(f"dim {dim} of size {moved.shape[0]} does not split over {world} ranks")
    out = torch.empty((moved.shape[0] // world,) + moved.shape[1:], dtype=moved.dtype,
                      device=moved.device)
    _record("reduce_scatter", moved.numel())
    _reduce_scatter_single(out, moved, group=group)
    return out.movedim(0, dim)


def split(tensor: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """This rank's slice of `tensor` along `dim` (no communication)."""
    world = group_size(group)
    if world == 1:
        return tensor
    if tensor.shape[dim] % world:
        raise ValueError(f"dim {dim} of size {tensor.shape[dim]} does not split over {world} ranks")
    rank = dist.get_rank(group)
    return tensor.chunk(world, dim=dim)[rank].contiguous()


def all_gather_into(output: torch.Tensor, shard: torch.Tensor, group: Group,
                    async_op: bool = False) -> dist.Work | None:
    """Flat all-gather into a given buffer: output = cat(every rank's equal-sized `shard`).
    Returns the work handle when async_op (None on a group of one)."""
    if group_size(group) == 1:
        output.copy_(shard)
        return None
    _record("all_gather", output.numel())
    return _all_gather_single(output, shard, group=group, async_op=async_op)


def reduce_scatter_into(shard: torch.Tensor, full: torch.Tensor, group: Group,
                        async_op: bool = False) -> dist.Work | None:
    """Flat reduce-scatter into a given buffer: shard = my slice of the sum of every rank's
    `full`. Returns the work handle when async_op (None on a group of one)."""
    if group_size(group) == 1:
        shard.copy_(full)
        return None
    _record("reduce_scatter", full.numel())
    return _reduce_scatter_single(shard, full, group=group, async_op=async_op)
