"""Flat buckets: how ZeRO lays a rank's parameters and gradients out in memory.

A bucket is a flat, contiguous buffer of one dtype holding several parameters back to back,
padded so that it splits into dp equal shards (Rajbhandari et al. 2019, section 5):

    bucket (padded_numel = dp * shard_numel)
    | p_7 ......... | p_6 ... | p_5 ............... | pad |
    |   shard of dp rank 0    |   shard of dp rank 1      |

Parameters are views into `param_buffer` and their gradients are added into `grad_buffer`, so a
whole bucket is reduced with one collective. Buckets are filled in reverse parameter order, the
order in which backward produces gradients, so the first bucket complete is the first sent.
A `ShardSegment` is the piece of one parameter inside this rank's shard: the optimizer walks
segments to apply per-parameter rules (weight decay, the norm's counting) to a flat shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ShardSegment:
    """Elements [param_lo, param_hi) of the flattened `param` sit at [shard_lo, shard_hi) of the
    owning bucket's shard."""

    param: nn.Parameter
    name: str
    param_lo: int
    param_hi: int
    shard_lo: int
    shard_hi: int


@dataclass(eq=False)
class Bucket:
    """A flat group of same-dtype parameters, reduced by one collective and sharded over dp: its
    layout, the memory the gradient buffer gives it, and its progress through the step."""

    index: int
    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]            # start of each parameter in the flat buffer
    dtype: torch.dtype
    padded_numel: int
    shard_world: int              # 1 (ZeRO-0: nothing sharded) or dp
    shard_rank: int
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

    @property
    def numel(self) -> int:
        return self.offsets[-1] + self.params[-1].numel() if self.params else 0

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.shard_world

    @property
    def shard_lo(self) -> int:
        return self.shard_rank * self.shard_numel

    def shard_of(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full flat buffer of this bucket."""
        return flat[self.shard_lo: self.shard_lo + self.shard_numel]


def pad_to_multiple(numel: int, multiple: int) -> int:
    return -(-numel // multiple) * multiple


def make_bucket(index: int, named_params: list[tuple[str, nn.Parameter]], shard_world: int,
                shard_rank: int, owner: nn.Module | None = None) -> Bucket:
    """Lay `named_params` out back to back; compute which of their pieces are in my shard."""
    dtypes = {p.dtype for _, p in named_params}
    if len(dtypes) != 1:
        raise ValueError(f"a bucket holds one dtype, got {sorted(map(str, dtypes))}")
    offsets, total = [], 0
    for _, param in named_params:
        offsets.append(total)
        total += param.numel()
    bucket = Bucket(index=index, params=[p for _, p in named_params],
                    names=[n for n, _ in named_params], offsets=offsets, dtype=dtypes.pop(),
                    padded_numel=pad_to_multiple(max(total, 1), shard_world),
                    shard_world=shard_world, shard_rank=shard_rank, owner=owner)
    lo, hi = bucket.shard_lo, bucket.shard_lo + bucket.shard_numel
    for (name, param), offset in zip(named_params, offsets):
        start, end = max(offset, lo), min(offset + param.numel(), hi)
        if start < end:
            bucket.segments.append(ShardSegment(param, name, start - offset, end - offset,
                                                start - lo, end - lo))
    return bucket


def split_by_size(named_params: list[tuple[str, nn.Parameter]],
                  bucket_numel: int) -> list[list[tuple[str, nn.Parameter]]]:
    """Consecutive groups of one dtype, each closed once it holds >= bucket_numel elements."""
    groups: list[list[tuple[str, nn.Parameter]]] = []
    current: list[tuple[str, nn.Parameter]] = []
    size = 0
    for name, param in named_params:
        if current and (param.dtype != current[0][1].dtype or size >= bucket_numel):
            groups.append(current)
            current, size = [], 0
        current.append((name, param))
        size += param.numel()
    if current:
        groups.append(current)
    return groups


def plan_by_size(named_params: list[tuple[str, nn.Parameter]], bucket_size_mb: float,
                 separate: list[nn.Parameter]) -> list[tuple[list, nn.Module | None]]:
    """ZeRO 0-2: buckets of about bucket_size_mb in backward (reverse) order.

    Parameters in `separate` (the tied word embedding under pipeline parallelism) get a bucket of
    their own, so its layout, and hence its shard, is the same on the first and the last stage.
    """
    alone = {id(p) for p in separate}
    ordered = [(n, p) for n, p in reversed(named_params) if id(p) not in alone]
    itemsize = ordered[0][1].element_size() if ordered else 4
    bucket_numel = max(1, int(bucket_size_mb * 2**20) // itemsize)
    plans = [([(n, p)], None) for n, p in named_params if id(p) in alone]
    plans += [(group, None) for group in split_by_size(ordered, bucket_numel)]
    return plans


# torch's op that resizes a storage in place, as FSDP2 uses it. The public
# `untyped_storage().resize_()` does the same but bypasses the dispatcher, so a dispatch mode
# (nanomt.memory.PeakMemoryMeter) would not see ZeRO-3 free and re-allocate its buffers; no
# public API resizes a storage through the dispatcher.
RESIZE_STORAGE_BYTES = torch.ops.inductor.resize_storage_bytes_.default


def resize_storage(tensor: torch.Tensor, nbytes: int) -> None:
    """Resize the storage behind `tensor` in place (ZeRO-3 frees a gathered buffer with 0 and
    allocates it again before the next all-gather); its views, the parameters, stay valid."""
    RESIZE_STORAGE_BYTES(tensor, nbytes)
