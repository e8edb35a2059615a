"""ZeRO-2/3 with parallel.grad_reduce=microbatch: reduce-scatter after every micro-batch (as
DeepSpeed's ZeRO-2), so only the gradient shard survives between micro-batches.

By default (grad_reduce=step) a bucket is reduced once per step, and its full gradient buffer
lives from the step's first gradient to the last micro-batch's backward: g Psi of gradients
through the accumulation. Here every micro-batch is a round of its own:

    round r of a bucket    every parameter has delivered r gradients -> reduce-scatter
                           (round 1 writes my shard, later rounds add into it when done)
                           -> the full buffer is freed; round r + 1 allocates a new one

What it buys: memory. Gradients take g Psi / N_d plus the buckets being filled and in flight
instead of g Psi during the accumulation (tests/test_zero.py measures both modes with the
memory meter: "microbatch" holds at most two full buckets and a shard beyond ZeRO-0's peak).
What it costs: m Psi of gradient traffic per step instead of Psi (tests/test_zero_traffic.py);
under a pipeline (m >= 64) about 32x ZeRO-0's traffic. Off by default for that reason.
"""

from __future__ import annotations

import torch

from nanomt.parallel import comm
from nanomt.parallel.data_parallel.buckets import Bucket
from nanomt.parallel.data_parallel.grad_buffer import Reduction
from nanomt.parallel.data_parallel.zero_stages import Zero2Buffer, Zero3Buffer


class ReduceEveryMicrobatch:
    """Mixed into the ZeRO-2/3 buffer before it: rounds of one micro-batch each."""

    def _round_target(self, b: Bucket) -> int:
        return b.rounds_launched + 1

    def _start_reduction(self, b: Bucket, final: bool) -> None:
        super()._start_reduction(b, final)
        # parameters that already delivered the next round's gradient (their gradients of two
        # micro-batches landed in this round's buffer) owe nothing more to it
        next_target = b.rounds_launched + 1
        b.pending = sum(self.arrivals[id(p)] < next_target for p in b.params)

    def _reduce_scatter(self, b: Bucket, full: torch.Tensor) -> Reduction:
        if b.rounds_launched == 1:
            return super()._reduce_scatter(b, full)
        work = comm.reduce_scatter_into(b.shard_of(full), full, b.group, async_op=True)
        return Reduction(b, work, full, adds_to_shard=True)

    def _retire(self, r: Reduction) -> None:
        super()._retire(r)
        if r.adds_to_shard:  # a later round: my shard of its sum adds to the earlier rounds'
            r.bucket.grad_shard.add_(r.bucket.shard_of(r.full))


class Zero2EveryMicrobatch(ReduceEveryMicrobatch, Zero2Buffer, stage=2, every_microbatch=True):
    pass


class Zero3EveryMicrobatch(ReduceEveryMicrobatch, Zero3Buffer, stage=3, every_microbatch=True):
    pass
