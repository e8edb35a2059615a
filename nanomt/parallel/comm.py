"""Collectives, in one place.

Every collective behind the f and g operators of tensor parallelism (Shoeybi et al. 2019, fig. 3:
all-reduce; under sequence parallelism all-gather and reduce-scatter) and behind ZeRO's sharded
data parallelism (Rajbhandari et al. 2020: flat all-gather / reduce-scatter into given buffers)
goes through these few functions, and so do expert parallelism's token exchanges (GShard,
Lepikhin et al. 2020: all-to-all with uneven splits). Each is a no-op on a group of one (the single-process model
pays nothing), notes what it enters for failure messages (nanomt.parallel.failures), and looks
torch.distributed up at each call, so a test can wrap it to count what a layout sends
(tests/comm_counting.py). `Group` is a process group, or None for a group of one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Re-exported (callers say comm.X): object collectives and failure naming live beside comm.
from nanomt.parallel.control_plane import all_gather_object, broadcast_object  # noqa: F401
from nanomt.parallel.control_plane import gather_object, world_rank  # noqa: F401
from nanomt.parallel.failures import describe_failure, is_communication_failure  # noqa: F401
from nanomt.parallel.failures import name_group, note_operation  # noqa: F401

# torch 2.13 renamed the single-tensor collectives (the old names warn); accept either.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

Group = dist.ProcessGroup | None


def group_size(group: Group) -> int:
    """Ranks in `group` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def rank_and_size(group: Group) -> tuple[int, int]:
    """(my rank in `group`, its size); (0, 1) for None."""
    size = group_size(group)
    return (0 if size == 1 else dist.get_rank(group)), size


def all_reduce(tensor: torch.Tensor, group: Group,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over `group`; returns the tensor."""
    if group_size(group) == 1:
        return tensor
    note_operation("all_reduce", group)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_async(tensor: torch.Tensor, group: Group) -> dist.Work | None:
    """In-place all-reduce (sum) launched asynchronously; returns its work handle (None on a
    group of one)."""
    if group_size(group) == 1:
        return None
    note_operation("all_reduce", group)
    return dist.all_reduce(tensor, group=group, async_op=True)


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
    note_operation("all_gather", group)
    _all_gather_single(out, moved, group=group)
    return out.movedim(0, dim)


def broadcast(tensor: torch.Tensor, src: int, group: Group) -> torch.Tensor:
    """In-place: every rank of `group` receives global rank `src`'s `tensor`; returns it."""
    if group_size(group) == 1:
        return tensor
    note_operation("broadcast", group)
    dist.broadcast(tensor, src=src, group=group)
    return tensor


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
    note_operation("reduce_scatter", group)
    _reduce_scatter_single(out, moved, group=group)
    return out.movedim(0, dim)


def all_gather_into(output: torch.Tensor, shard: torch.Tensor, group: Group,
                    async_op: bool = False) -> dist.Work | None:
    """Flat all-gather into a given buffer: output = cat(every rank's equal-sized `shard`).
    Returns the work handle when async_op (None on a group of one)."""
    if group_size(group) == 1:
        output.copy_(shard)
        return None
    note_operation("all_gather", group)
    return _all_gather_single(output, shard, group=group, async_op=async_op)


def reduce_scatter_into(shard: torch.Tensor, full: torch.Tensor, group: Group,
                        async_op: bool = False) -> dist.Work | None:
    """Flat reduce-scatter into a given buffer: shard = my slice of the sum of every rank's
    `full`. Returns the work handle when async_op (None on a group of one)."""
    if group_size(group) == 1:
        shard.copy_(full)
        return None
    note_operation("reduce_scatter", group)
    return _reduce_scatter_single(shard, full, group=group, async_op=async_op)


def all_to_all_single(tensor: torch.Tensor, output_splits: list[int], input_splits: list[int],
                      group: Group) -> torch.Tensor:
    """Rank i sends rows [sum(input_splits[:j]), sum(input_splits[:j+1])) of `tensor` to rank j
    and receives output_splits[j] rows from rank j: the output is what every rank sent me,
    concatenated in rank order. Splits may be uneven (and zero)."""
    if group_size(group) == 1:
        return tensor
    out = torch.empty((sum(output_splits),) + tuple(tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    note_operation("all_to_all", group)
    dist.all_to_all_single(out, tensor.contiguous(), output_splits, input_splits, group=group)
    return out
