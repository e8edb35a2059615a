"""The f and g operators of Megatron tensor parallelism, and sequence parallelism's f-bar.

Shoeybi et al. 2019 (fig. 3) split a transformer layer's matrices across t ranks with two
conjugate operators around each parallel block:

    f: identity in forward,  all-reduce in backward   (enters a column-parallel block)
    g: all-reduce in forward, identity in backward    (leaves a row-parallel block)

Sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2) replaces them with g-bar / f-bar:
an all-gather along the sequence before the column-parallel linear (reduce-scatter in backward)
and a reduce-scatter after the row-parallel one (all-gather in backward). Same bytes moved, but
norms, dropout and residual adds run on 1/t of the sequence. g-bar is fused with the
column-parallel matmul (tensor_parallel._LinearWithSequenceGather) to save its input.

Activations are [seq, batch, hidden] (Megatron's layout): the hidden/vocab split is the last dim
and the sequence split dim 0 (`SEQ_DIM`), so a sequence shard is a contiguous block of memory
gathered and scattered in place. On a group of one every operator is the identity.
"""

from __future__ import annotations

import torch

from nanomt.parallel import comm
from nanomt.parallel.comm import Group

SEQ_DIM = 0


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """f: identity forward, all-reduce the input gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """f-bar: reduce-scatter the sequence forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.reduce_scatter(x, group, dim=SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group, dim=SEQ_DIM), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if comm.group_size(group) == 1 else _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if comm.group_size(group) == 1 else _ReduceFromTensorParallelRegion.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    if comm.group_size(group) == 1:
        return x
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)
