"""The f and g operators of Megatron tensor parallelism, and their sequence-parallel cousins.

Shoeybi et al. 2019 (fig. 3) split a transformer layer's matrices across t ranks with two
conjugate operators around each parallel block:

    f: identity in forward,  all-reduce in backward   (enters a column-parallel block)
    g: all-reduce in forward, identity in backward    (leaves a row-parallel block)

Sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2) replaces them with g-bar / f-bar:
an all-gather along the sequence before the column-parallel linear (reduce-scatter in backward)
and a reduce-scatter after the row-parallel one (all-gather in backward). Same bytes moved, but
LayerNorm and dropout now run on 1/t of the sequence.

Activations are [batch, seq, hidden]: the hidden/vocab split is the last dim, the sequence split
dim 1. Each operator is a tiny autograd function; with a group of one they are all identities.
"""

from __future__ import annotations

import torch

from nanomt.parallel import comm
from nanomt.parallel.comm import Group

SEQ_DIM = 1


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


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    """All-gather the last dim forward, keep my slice backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather(x, group, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return comm.split(grad, ctx.group, dim=-1), None


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    """Keep my slice of the last dim forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.split(x, group, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group, dim=-1), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Keep my slice of the sequence forward, all-gather backward (enter the SP region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.split(x, group, dim=SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group, dim=SEQ_DIM), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """g-bar: all-gather the sequence forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return comm.all_gather(x, group, dim=SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:  # the gathered tensor fed a tp-split matmul: partial sums
            return comm.reduce_scatter(grad, ctx.group, dim=SEQ_DIM), None, None
        return comm.split(grad, ctx.group, dim=SEQ_DIM), None, None


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
    """f: identity forward, all-reduce of the gradient backward."""
    return x if comm.group_size(group) == 1 else _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """g: all-reduce forward, identity backward."""
    return x if comm.group_size(group) == 1 else _ReduceFromTensorParallelRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather the last dim forward (split it backward)."""
    return x if comm.group_size(group) == 1 else _GatherFromTensorParallelRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep my slice of the last dim forward (all-gather backward)."""
    return x if comm.group_size(group) == 1 else _ScatterToTensorParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep my sequence shard forward (all-gather backward): enter the SP region."""
    return x if comm.group_size(group) == 1 else _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: Group, reduce_grad: bool = True
) -> torch.Tensor:
    """g-bar: all-gather the sequence forward; backward reduce-scatter (`reduce_grad`: the
    gathered tensor fed a tp-split matmul) or just split."""
    if comm.group_size(group) == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, reduce_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """f-bar: reduce-scatter the sequence forward, all-gather backward."""
    if comm.group_size(group) == 1:
        return x
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)
