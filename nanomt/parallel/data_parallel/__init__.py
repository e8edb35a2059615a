"""Data parallelism (with ZeRO's sharding, Rajbhandari et al. 2019), kept apart from the optimizer.

    buffer = GradientBuffer(chunks, grid, zero_stage=2, num_microbatches=m)  # grad_buffer.py
    ... forward/backward of every micro-batch (any schedule): hooks reduce buckets over dp ...
    finalize_grads(buffer)      # wait for the reductions; SP and tied-embedding sums (finalize.py)
    optimizer.step()            # nanomt.optim: clip, AdamW on my shard, buffer.publish_params

The core, in reading order: buckets.py (flat buffers, shards), grad_buffer.py (what every stage
does: accumulate, reduce when complete, publish), zero_stages.py (ZeRO-0..3, one class each),
stage3.py (ZeRO-3: gather/free parameters around each layer), finalize.py (the phase between
schedule and optimizer). Layers, each named for what it buys: reductions_in_flight.py (bounded
memory for ZeRO-2/3's reduce-scatters in flight), microbatch_reduce.py (grad_reduce=microbatch:
only gradient shards between micro-batches), zero3_prefetch.py (the next layer's gather during
this one's compute), param_gather.py (ZeRO-1/2: the parameters' all-gather waited for in the
next forward), memory_accounting.py (the bytes held and their peak, for ZeRO's memory checks).
"""

# Importing the stages' modules registers their classes with GradientBuffer.
from nanomt.parallel.data_parallel import microbatch_reduce, zero_stages  # noqa: F401
from nanomt.parallel.data_parallel.finalize import finalize_grads
from nanomt.parallel.data_parallel.grad_buffer import GradientBuffer

__all__ = ["GradientBuffer", "finalize_grads"]
