"""Flat buckets: how ZeRO lays a rank's parameters and gradients out in memory.

A bucket holds several parameters of one dtype back to back in one flat buffer, padded to split
into equal shards over its group (Rajbhandari et al. 2019, section 5), and is reduced by one
collective over that group: grad_sync_group (dp x cp), or for experts' weights (ParamInfo.expert,
never in a bucket with other parameters) expert_dp_group, the ranks holding the same experts:

    bucket (padded_numel = group_size * shard_numel)
    | p_7 ......... | p_6 ... | p_5 ............... | pad |
    |  shard of group rank 0  |  shard of group rank 1    |

Buckets follow reverse parameter order, the order of backward, so the first complete is the
first sent. A `ShardSegment` is one parameter's piece of my shard: the optimizer walks segments
to apply per-parameter rules (weight decay, the norm's counting) to a flat shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanomt.parallel import comm
from nanomt.parallel.param_info import param_info


@dataclass
class ShardSegment:
    """Elements [param_lo, param_hi) of the flattened `param` sit at [shard_lo, shard_hi) of the
    owning bucket's shard."""

    param: nn.Parameter
    param_lo: int
    param_hi: int
    shard_lo: int
    shard_hi: int


@dataclass(eq=False)
class Bucket:
    """One bucket: its layout (fixed by make_bucket), its memory, its progress in the step."""

    index: int
    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]            # start of each parameter in the flat buffer
    dtype: torch.dtype
    group: comm.Group             # the ranks it is reduced (and sharded) over; None: one
    group_size: int
    group_rank: int
    numel: int                    # the parameters' elements; then padding up to padded_numel
    padded_numel: int             # shard_world * shard_numel
    shard_numel: int
    shard_lo: int                 # my shard: [shard_lo, shard_lo + shard_numel)
    owner: nn.Module | None = None  # ZeRO-3: the module whose forward needs this bucket gathered
    segments: list[ShardSegment] = field(default_factory=list)
    # memory
    param_buffer: torch.Tensor | None = None  # every parameter, flat (ZeRO-3: only while gathered)
    param_shard: torch.Tensor | None = None   # ZeRO-3: my 1/dp of the parameters, kept for good
    grad_buffer: torch.Tensor | None = None   # full gradients (ZeRO-2/3: while this round's arrive)
    grad_shard: torch.Tensor | None = None    # my slice of the reduced gradients
    grads_are_views: bool = False  # `param.grad` may be a view of grad_buffer (same dtype)
    freed_stand_in: torch.Tensor | None = None  # ZeRO-3: one NaN that freed parameters point at
    # progress through the step
    filled: set[int] = field(default_factory=set)  # id(param): its slot holds this round's grads
    pending: int = 0              # parameters still owing this round's gradient
    rounds_launched: int = 0      # reductions started this step (> 1: grad_reduce=microbatch)
    final_launched: bool = False  # the step's last reduction started: no gradient may follow
    gathered: bool = False        # ZeRO-3: param_buffer holds the parameters now

    def shard_of(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full flat buffer of this bucket."""
        return flat[self.shard_lo: self.shard_lo + self.shard_numel]


def make_bucket(index: int, named_params: list[tuple[str, nn.Parameter]], group: comm.Group,
                sharded: bool, owner: nn.Module | None = None) -> Bucket:
    """Lay `named_params` out back to back, padded to one equal shard per rank of `group`
    (sharded: ZeRO 1-3; else one shard, the whole bucket); note which of their pieces fall in
    my shard."""
    dtypes = {p.dtype for _, p in named_params}
    if len(dtypes) != 1:
        raise ValueError(f"a bucket holds one dtype, got {sorted(map(str, dtypes))}")
    offsets, total = [], 0
    for _, param in named_params:
        offsets.append(total)
        total += param.numel()
    group_rank, group_size = comm.rank_and_size(group)
    shard_world, shard_rank = (group_size, group_rank) if sharded else (1, 0)
    shard_numel = -(-max(total, 1) // shard_world)  # rounded up
    lo, hi = shard_rank * shard_numel, (shard_rank + 1) * shard_numel
    bucket = Bucket(index=index, params=[p for _, p in named_params],
                    names=[n for n, _ in named_params], offsets=offsets, dtype=dtypes.pop(),
                    group=group, group_size=group_size, group_rank=group_rank, numel=total,
                    padded_numel=shard_world * shard_numel,
                    shard_numel=shard_numel, shard_lo=lo, owner=owner)
    for param, offset in zip(bucket.params, offsets):
        start, end = max(offset, lo), min(offset + param.numel(), hi)
        if start < end:
            bucket.segments.append(ShardSegment(param, start - offset, end - offset,
                                                start - lo, end - lo))
    return bucket


def plan_by_size(named_params: list[tuple[str, nn.Parameter]], bucket_size_mb: float,
                 separate: list[nn.Parameter]) -> list[tuple[list, nn.Module | None]]:
    """ZeRO 0-2: buckets of one dtype in backward order, each closed once it holds
    bucket_size_mb, experts' weights never with others. `separate` (the tied embedding under
    pp) gets its own, so its shard is the same on the first and the last stage."""
    alone = {id(p) for p in separate}
    plans = [([(n, p)], None) for n, p in named_params if id(p) in alone]
    ordered = [(n, p) for n, p in reversed(named_params) if id(p) not in alone]
    itemsize = ordered[0][1].element_size() if ordered else 4
    bucket_numel = max(1, int(bucket_size_mb * 2**20) // itemsize)
    group: list[tuple[str, nn.Parameter]] = []
    size = 0
    for name, param in ordered:
        if group and (param.dtype != group[0][1].dtype or size >= bucket_numel
                      or is_expert(param) != is_expert(group[0][1])):
            plans.append((group, None))
            group, size = [], 0
        group.append((name, param))
        size += param.numel()
    if group:
        plans.append((group, None))
    return plans


def is_expert(param: nn.Parameter) -> bool:
    return param_info(param).expert


def split_experts(named_params: list[tuple[str, nn.Parameter]]) -> list[list]:
    """The non-empty of [the parameters that are not experts' weights, those that are]."""
    groups = [[(n, p) for n, p in named_params if is_expert(p) == expert] for expert in (0, 1)]
    return [group for group in groups if group]


# Private, as FSDP2 uses it: the public `untyped_storage().resize_()` bypasses the dispatcher,
# so nanomt.memory's dispatch-mode meter would not see ZeRO-3 free and re-allocate its buffers.
RESIZE_STORAGE_BYTES = torch.ops.inductor.resize_storage_bytes_.default


def resize_storage(tensor: torch.Tensor, nbytes: int) -> None:
    """Resize the storage behind `tensor` in place; its views, the parameters, stay valid."""
    RESIZE_STORAGE_BYTES(tensor, nbytes)
