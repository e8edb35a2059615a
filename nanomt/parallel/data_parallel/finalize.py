"""Finalising gradients: the step's phase between the schedule and the optimizer.

After the last backward of a step, every gradient must be complete before anyone clips it
(Megatron's finalize_model_grads):

    1. data parallel    wait for the buckets' all-reduces / reduce-scatters over dp
    2. sequence parallel  a norm weight or bias under SP sees only this rank's s/t tokens, so its
                        gradient is a partial sum over tp: all-reduce it over the tp group
    3. tied embedding   the word embedding lives on the first and the last pipeline stage (input
                        and output layer); each holds half of its gradient: all-reduce the two
                        over the embedding group

Sums are linear, so 2 and 3 commute with 1 and run on this rank's reduced shard only. Buckets
have the same layout on every tp rank of a stage (equal shard shapes), and the tied embedding
has a bucket of its own with the same layout on both stages, so the shards line up.
"""

from __future__ import annotations

import torch

from nanomt.parallel import comm
from nanomt.parallel.data_parallel.grad_buffer import GradientBuffer
from nanomt.parallel.param_info import param_info


@torch.no_grad()
def finalize_grads(buffer: GradientBuffer) -> None:
    """Make every gradient shard final for this step; a second call does nothing."""
    if not buffer.finish_grad_sync():
        return
    grid = buffer.grid
    if grid is None:
        return
    sp_pieces = [b.grad_shard[s.shard_lo: s.shard_hi] for b in buffer.buckets
                 for s in b.segments if param_info(s.param).sequence_parallel]
    comm.all_reduce_coalesced(sp_pieces, grid.tp_group)
    if comm.group_size(grid.embedding_group) > 1:
        for param in buffer.shared_embedding_params():
            comm.all_reduce(buffer.bucket_of[id(param)].grad_shard, grid.embedding_group)
