"""Tensor-parallel layers: Megatron's intra-layer model parallelism (Shoeybi et al. 2019).

A linear Y = X A is split two ways across t ranks:

    ColumnParallelLinear  A = [A_1 ... A_t] by output columns: rank i computes Y_i = X A_i.
                          Its input passes through f (identity fwd, all-reduce bwd).
    RowParallelLinear     A = [A_1; ...; A_t] by input rows, input already split: rank i computes
                          the partial sum X_i A_i, and g all-reduces the partials (fwd only).

An MLP is Column -> GeLU -> Row and attention is Column(QKV, heads split) -> attention -> Row:
one f and one g each, so a transformer layer costs two all-reduces forward and two backward.

Every layer is built from the full (unsplit) initial weight, drawn by `init_fn`, and keeps its
slice: with the same seed, the model at tp=N holds exactly the shards of the model at tp=1.
Each sharded parameter carries `tp_split_dim` (the dim it is split along) so gradient norms,
checkpoints and tests can tell shards from replicas. Parameters whose gradient is partial over
the sequence when sequence parallelism is on carry `sequence_parallel = True`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanomt.parallel import comm
from nanomt.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

InitFn = Callable[[tuple[int, ...]], torch.Tensor]


def tp_rank_and_size(group) -> tuple[int, int]:
    size = comm.group_size(group)
    return (0 if size == 1 else torch.distributed.get_rank(group)), size


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor-parallel size "
                         f"{denominator}")
    return numerator // denominator


def shard_parameter(full: torch.Tensor, group, dim: int | None) -> nn.Parameter:
    """This rank's slice of `full` along `dim` (None: replicated) as a Parameter."""
    rank, size = tp_rank_and_size(group)
    data = full if dim is None or size == 1 else full.chunk(size, dim=dim)[rank]
    param = nn.Parameter(data.clone().contiguous())
    param.tp_split_dim = None if size == 1 else dim
    return param


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split by output features. Output stays split unless `gather_output`."""

    def __init__(self, in_features: int, out_features: int, tp_group, init_fn: InitFn,
                 bias: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False):
        super().__init__()
        _, tp = tp_rank_and_size(tp_group)
        self.out_features_per_rank = divide(out_features, tp, "output features")
        self.tp_group, self.gather_output = tp_group, gather_output
        self.sequence_parallel = sequence_parallel and tp > 1
        self.weight = shard_parameter(init_fn((out_features, in_features)), tp_group, dim=0)
        self.bias = shard_parameter(torch.zeros(out_features), tp_group, dim=0) if bias else None

    def enter_parallel_region(self, x: torch.Tensor) -> torch.Tensor:
        """f (identity fwd, all-reduce bwd), or under SP g-bar (all-gather the sequence)."""
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(x, self.tp_group)
        return copy_to_tensor_parallel_region(x, self.tp_group)

    def forward(self, x: torch.Tensor, input_entered: bool = False) -> torch.Tensor:
        """`input_entered`: x already went through `enter_parallel_region` (two column-parallel
        linears reading one input, as SwiGLU's gate and up, share one f: one collective)."""
        if not input_entered:
            x = self.enter_parallel_region(x)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, self.tp_group)
        return y


class RowParallelLinear(nn.Module):
    """Y = X A + b with A split by input features; X arrives split along its last dim."""

    def __init__(self, in_features: int, out_features: int, tp_group, init_fn: InitFn,
                 bias: bool = True, sequence_parallel: bool = False):
        super().__init__()
        _, tp = tp_rank_and_size(tp_group)
        divide(in_features, tp, "input features")
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and tp > 1
        self.weight = shard_parameter(init_fn((out_features, in_features)), tp_group, dim=1)
        self.bias = shard_parameter(torch.zeros(out_features), tp_group, None) if bias else None
        if self.bias is not None and self.sequence_parallel:
            self.bias.sequence_parallel = True  # added to a sequence shard: partial gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:  # f-bar: sum the partials and keep my sequence shard
            y = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
        else:  # g
            y = reduce_from_tensor_parallel_region(partial, self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Word embedding with the vocabulary split across tp ranks (rows [start, end) on each).

    A rank looks up the tokens it owns, writes zeros for the others, and g sums the partial
    embeddings. Under sequence parallelism the sum is a reduce-scatter instead: the output is
    this rank's sequence shard [b, s/t, h] (half the traffic of the all-reduce, and no
    full-sequence copy). `padded_vocab_size` rows exist (divisible by tp); rows past
    `vocab_size` are padding, initialised to zero and masked out of the loss.
    """

    def __init__(self, vocab_size: int, padded_vocab_size: int, embedding_dim: int, tp_group,
                 init_fn: InitFn, sequence_parallel: bool = False):
        super().__init__()
        rank, tp = tp_rank_and_size(tp_group)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and tp > 1
        self.vocab_size, self.padded_vocab_size = vocab_size, padded_vocab_size
        per_rank = divide(padded_vocab_size, tp, "padded vocabulary size")
        self.vocab_start, self.vocab_end = rank * per_rank, (rank + 1) * per_rank
        full = torch.zeros(padded_vocab_size, embedding_dim)
        full[:vocab_size] = init_fn((vocab_size, embedding_dim))
        self.weight = shard_parameter(full, tp_group, dim=0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if comm.group_size(self.tp_group) == 1:
            return F.embedding(token_ids, self.weight)
        outside = (token_ids < self.vocab_start) | (token_ids >= self.vocab_end)
        local_ids = (token_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
        return reduce_from_tensor_parallel_region(partial, self.tp_group)


def parallel_lm_logits(hidden: torch.Tensor, word_weight: torch.Tensor, tp_group,
                       sequence_parallel: bool) -> torch.Tensor:
    """Logits for my vocabulary shard: [b, s, padded_vocab / tp]. Never the full vocabulary."""
    if sequence_parallel and comm.group_size(tp_group) > 1:
        hidden = gather_from_sequence_parallel_region(hidden, tp_group)
    else:
        hidden = copy_to_tensor_parallel_region(hidden, tp_group)
    return F.linear(hidden, word_weight)
