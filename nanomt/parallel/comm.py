"""Collectives, in one place.

Every collective behind the f and g operators of tensor parallelism (Shoeybi et al. 2019, fig. 3:
all-reduce; under sequence parallelism all-gather and reduce-scatter) and behind ZeRO's sharded
data parallelism (Rajbhandari et al. 2020: flat all-gather / reduce-scatter into given buffers)
goes through these few functions. Each is a no-op on a group of one (the single-process model
pays nothing). They call torch.distributed through attributes looked up at each call
(`dist.all_reduce`, `_all_gather_single`, ...), so a test can wrap them to count what a layout
sends (tests/comm_counting.py).

`Group` is a process group, or None for a group of one rank (the grid creates none).

Each call also notes which operation this rank entered last and on which named group (`name_group`:
the grid names tp, pp, dp, embedding, model_parallel; None and the default group are "world").
When a rank stalls or dies, its peers' operation fails (gloo: after the group's timeout; NCCL:
its watchdog), and `describe_failure` turns that into a line naming the operation and group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives (the old names warn); accept either.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

Group = dist.ProcessGroup | None

# ---- naming what failed ----------------------------------------------------------------------
_GROUP_NAMES: dict[int, str] = {}
LAST_OPERATION: tuple[str, str] | None = None  # (kind, group name) this rank entered last


def name_group(group: Group, name: str) -> None:
    """Call `group` by `name` in failure messages."""
    if group is not None:
        _GROUP_NAMES[id(group)] = name


def group_name(group: Group) -> str:
    if group is None or group is dist.group.WORLD:
        return "world"
    return _GROUP_NAMES.get(id(group), "unnamed")


def note_operation(kind: str, group: Group) -> None:
    """Remember that this rank entered `kind` on `group` (also for operations issued elsewhere:
    point-to-point batches, waits on asynchronous work)."""
    global LAST_OPERATION
    LAST_OPERATION = (kind, group_name(group))


def is_communication_failure(error: BaseException) -> bool:
    """True for the errors a failed or timed-out collective raises (gloo, NCCL, the store)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "NCCL", "Timed out", "Connection reset",
                                      "Connection closed", "ProcessGroup"))


def describe_failure(error: BaseException, when: str) -> str:
    """'<operation> on the <group> group failed during <when>: <the backend's first sentence>'."""
    kind, group = LAST_OPERATION or ("a collective", "unknown")
    detail = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    if detail.startswith("[") and "] " in detail:  # gloo's "[/path/to/file.cc:123] " prefix
        detail = detail.split("] ", 1)[1]
    detail = detail.split(". ", 1)[0].rstrip(".")
    return f"{kind} on the {group} group failed during {when}: {detail[:160]}"


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


# ---- control-plane collectives (barriers and Python objects, on the world group) --------------
def world_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier(group: Group = None) -> None:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    note_operation("barrier", group)
    dist.barrier(group=group)


def broadcast_object(value: object, src: int = 0, group: Group = None) -> object:
    """`value` from global rank `src`, on every rank."""
    if not dist.is_initialized():
        return value
    note_operation("broadcast_object", group)
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(value: object, group: Group = None) -> list:
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
