"""finalize_grads: the step's phase between the schedule and the optimizer (Megatron's
finalize_model_grads). Every gradient is complete before anyone clips it:

    1. data parallel      wait for the buckets' reductions over dp
    2. sequence parallel  a norm's gradient under SP covers only this rank's s/t tokens: a
                          partial sum, all-reduced over tp
    3. tied embedding     the first and last stage each hold part of its gradient: all-reduced
                          over the embedding group

Sums are linear, so 2 and 3 run on my reduced shard only (the buckets' layouts match).
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
