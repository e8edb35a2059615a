"""Data parallelism (with ZeRO's sharding, Rajbhandari et al. 2019), kept apart from the optimizer.

    buffer = GradientBuffer(chunks, grid, zero_stage=2, num_microbatches=m)  # grad_buffer.py
    ... forward/backward of every micro-batch (any schedule): hooks reduce buckets over dp ...
    finalize_grads(buffer)      # wait for the reductions; SP and tied-embedding sums (finalize.py)
    optimizer.step()            # nanomt.optim.ShardedAdamW: clip, AdamW on my shard, publish

Files: buckets.py (flat buffers, shards), grad_buffer.py (hooks, reductions, publishing),
finalize.py (the phase between schedule and optimizer), stage3.py (ZeRO-3: gather/free
parameters around each layer, with prefetch), param_gather.py (ZeRO-1/2: the updated
parameters' all-gather waited for in the next forward).
"""

from nanomt.parallel.data_parallel.finalize import finalize_grads
from nanomt.parallel.data_parallel.grad_buffer import GRAD_REDUCE_MODES, GradientBuffer

__all__ = ["GRAD_REDUCE_MODES", "GradientBuffer", "finalize_grads"]
