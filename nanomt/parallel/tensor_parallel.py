"""Tensor-parallel layers: Megatron's intra-layer model parallelism (Shoeybi et al. 2019).

A linear Y = X A^T is split two ways across t ranks:

    ColumnParallelLinear  A = [A_1; ...; A_t] by output rows: rank i computes Y_i = X A_i^T.
                          Its input passes through f (identity fwd, all-reduce bwd).
    RowParallelLinear     A = [A_1 ... A_t] by input columns, input already split: rank i
                          computes the partial sum X_i A_i^T, and g all-reduces the partials.

An MLP is Column -> GeLU -> Row and attention is Column(QKV, heads split) -> attention -> Row:
one f and one g each, so a transformer layer costs two all-reduces forward and two backward.

Sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2) keeps X split along the sequence
between the blocks: a column-parallel linear all-gathers it (g-bar) and a row-parallel one
reduce-scatters its partial sums (f-bar). `_LinearWithSequenceGather` keeps only this rank's
[s/t, b, h] shard of X for backward and all-gathers it there again for the weight gradient: the
saved input costs s b h / t, not s b h, for one more all-gather per linear in backward.

Each layer draws its shard blockwise (nanomt.parallel.blockwise_init) and records how, in
`initializers`, so the model can also be built on the meta device and drawn later
(nanomt.parallel.deferred_init). `tp_split_dims` declares the dim each parameter is split along
(None: replicated); the model turns it into every parameter's ParamInfo.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from nanomt.parallel import comm
from nanomt.parallel.blockwise_init import NormalInit, vocab_shard
from nanomt.parallel.comm import Group
from nanomt.parallel.deferred_init import new_parameter
from nanomt.parallel.mappings import (
    SEQ_DIM,
    copy_to_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


def my_slice(size: int, group: Group) -> range:
    """The indices [start, end) of a dim of `size` that this rank holds (contiguous split;
    config validation guarantees that tp divides it)."""
    rank, tp = comm.rank_and_size(group)
    per_rank = size // tp
    return range(rank * per_rank, (rank + 1) * per_rank)


class _LinearWithSequenceGather(torch.autograd.Function):
    """y = all_gather_seq(x) W^T + b, keeping only x, this rank's sequence shard, for backward.

    forward   x [s/t, b, in] -> all-gather along the sequence -> x_full [s, b, in]
              -> y = x_full W^T + b [s, b, out/t]; x_full is freed on return.
    backward  grad_x_full = dy W is a partial sum (my out/t columns only): reduce-scatter it
              along the sequence -> my shard of the sum [s/t, b, in];
              then all-gather x again for grad_W = dy^T x_full and grad_b = sum dy.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(comm.all_gather(x, group, dim=SEQ_DIM), weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:  # first, so its full-sequence temporary is gone before x_full exists
            grad_x = comm.reduce_scatter(grad_y.matmul(weight), ctx.group, dim=SEQ_DIM)
        grad_y_2d = grad_y.reshape(-1, grad_y.shape[-1])
        if need_w:
            x_full = comm.all_gather(x, ctx.group, dim=SEQ_DIM)  # the recompute that saves s b h
            grad_w = grad_y_2d.t().matmul(x_full.reshape(-1, x_full.shape[-1]))
        if need_b and ctx.has_bias:
            grad_b = grad_y_2d.sum(dim=0)
        return grad_x, grad_w, grad_b, None


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           tp_group: Group, sequence_parallel: bool) -> torch.Tensor:
    """x W^T + b for a weight split by output rows: f then a matmul, or under sequence
    parallelism (x a sequence shard) the gather-and-matmul that saves only the shard."""
    if sequence_parallel and comm.group_size(tp_group) > 1:
        return _LinearWithSequenceGather.apply(x, weight, bias, tp_group)
    return F.linear(copy_to_tensor_parallel_region(x, tp_group), weight, bias)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by output features; the output stays split.

    `stacked` > 1 fuses that many linears of the same input into one weight [stacked, out, in]
    split along dim 1 (as SwiGLU's gate and up): each rank holds rows [i out/t, (i+1) out/t) of
    every part, and its output [..., stacked * out/t] holds its columns of each part in turn
    (`y.chunk(stacked, -1)`). One input, one f: one collective for all parts.
    """
    parallel_linear = staticmethod(column_parallel_linear)  # a layer may replace it per module

    def __init__(self, in_features: int, out_features: int, tp_group: Group, init: NormalInit,
                 bias: bool = True, sequence_parallel: bool = False, stacked: int = 1):
        super().__init__()
        rows = my_slice(out_features, tp_group)
        self.in_features = in_features
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and comm.group_size(tp_group) > 1
        parts, split_dim = ((), 0) if stacked == 1 else ((stacked,), 1)
        full = parts + (out_features, in_features)
        local = full[:split_dim] + (len(rows),) + full[split_dim + 1:]
        self.initializers = {"weight": partial(init.slices, full, split_dim, rows),
                             "bias": partial(torch.zeros, parts + (len(rows),))}
        self.weight = new_parameter(self.initializers["weight"], local)
        self.bias = new_parameter(self.initializers["bias"], parts + (len(rows),)) if bias else None
        self.tp_split_dims = {"weight": split_dim, "bias": split_dim}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.reshape(-1, self.in_features)  # a view: stacked parts as rows
        bias = self.bias.reshape(-1) if self.bias is not None else None
        return self.parallel_linear(x, weight, bias, self.tp_group, self.sequence_parallel)


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by input features; X arrives split along its last dim."""
    matmul = staticmethod(F.linear)  # a layer may replace it per module

    def __init__(self, in_features: int, out_features: int, tp_group: Group, init: NormalInit,
                 bias: bool = True, sequence_parallel: bool = False):
        super().__init__()
        columns = my_slice(in_features, tp_group)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and comm.group_size(tp_group) > 1
        self.initializers = {"weight": partial(init.slices, (out_features, in_features), 1,
                                               columns),
                             "bias": partial(torch.zeros, out_features)}
        self.weight = new_parameter(self.initializers["weight"], (out_features, len(columns)))
        self.bias = new_parameter(self.initializers["bias"], (out_features,)) if bias else None
        self.tp_split_dims = {"weight": 1, "bias": None}  # the bias is added after g: replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if comm.group_size(self.tp_group) == 1:  # nothing to sum: one fused multiply-add
            return self.matmul(x, self.weight, self.bias)
        partial = self.matmul(x, self.weight)
        if self.sequence_parallel:  # f-bar: sum the partials and keep my sequence shard
            y = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
        else:  # g
            y = reduce_from_tensor_parallel_region(partial, self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Word embedding with the vocabulary split across tp ranks (rows [start, end) on each).

    A rank looks up the tokens it owns, writes zeros for the others, and g sums the partial
    embeddings; under sequence parallelism f-bar reduce-scatters them to this rank's sequence
    shard [s/t, b, h]. `padded_vocab_size` rows exist (divisible by tp); rows past `vocab_size`
    are padding, initialised to zero and masked out of the loss.
    """

    def __init__(self, vocab_size: int, padded_vocab_size: int, embedding_dim: int,
                 tp_group: Group, init: NormalInit, sequence_parallel: bool = False):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and comm.group_size(tp_group) > 1
        self.vocab_size, self.padded_vocab_size = vocab_size, padded_vocab_size
        rows = my_slice(padded_vocab_size, tp_group)
        self.vocab_start, self.vocab_end = rows.start, rows.stop
        self.initializers = {"weight": partial(vocab_shard, vocab_size, embedding_dim, rows, init)}
        self.weight = new_parameter(self.initializers["weight"], (len(rows), embedding_dim))
        self.tp_split_dims = {"weight": 0}

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if comm.group_size(self.tp_group) == 1:
            return F.embedding(token_ids, self.weight)
        outside = (token_ids < self.vocab_start) | (token_ids >= self.vocab_end)
        local_ids = (token_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
        return reduce_from_tensor_parallel_region(partial, self.tp_group)


class VocabParallelOutput(nn.Module):
    """The untied output layer: a [padded_vocab, h] weight split by vocabulary rows like the
    embedding (same padding, same shards), read by `parallel_lm_logits` instead of looked up."""

    def __init__(self, vocab_size: int, padded_vocab_size: int, hidden_size: int,
                 tp_group: Group, init: NormalInit):
        super().__init__()
        rows = my_slice(padded_vocab_size, tp_group)
        self.vocab_size = vocab_size
        self.initializers = {"weight": partial(vocab_shard, vocab_size, hidden_size, rows, init)}
        self.weight = new_parameter(self.initializers["weight"], (len(rows), hidden_size))
        self.tp_split_dims = {"weight": 0}


# The layers that split parameters over tp; each declares `tp_split_dims` {name: dim or None}.
TENSOR_PARALLEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                          VocabParallelOutput)


def parallel_lm_logits(hidden: torch.Tensor, word_weight: torch.Tensor, tp_group: Group,
                       sequence_parallel: bool) -> torch.Tensor:
    """Logits for my vocabulary shard: [s, b, padded_vocab / tp]. Never the full vocabulary.
    The head is a column-parallel linear without bias (the vocabulary split is by rows)."""
    return column_parallel_linear(hidden, word_weight, None, tp_group, sequence_parallel)
