"""The four ZeRO stages (Rajbhandari et al. 2019), one class each: what is sharded over the N_d
dp ranks, which collective reduces a bucket, how the updated parameters reach every rank. Per
rank, with Psi parameters, mixed-precision Adam (bytes: 2 parameter, 2 gradient, K = 12 state)
and section 7's traffic (an all-reduce moves 2 Psi, a reduce-scatter or an all-gather Psi):

             model-state bytes            traffic      the reduction
    stage 0  (2 + 2 + K) Psi              2 Psi        all-reduce the gradient buffer in place
    stage 1  (2 + 2) Psi + K Psi / N_d    Psi + Psi    reduce-scatter in place; after the
                                                       update, all-gather the parameters
    stage 2  2 Psi + (2 + K) Psi / N_d    Psi + Psi    as 1, but a full gradient buffer lives
                                                       only while its bucket's gradients arrive
    stage 3  (2 + 2 + K) Psi / N_d        Psi + 2m Psi as 2, and parameters gathered around
                                                       each layer's use (stage3.py)

Each bucket is reduced once a step, in the last micro-batch's backward (microbatch_reduce.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from nanomt.parallel import comm
from nanomt.parallel.data_parallel.buckets import Bucket
from nanomt.parallel.data_parallel.grad_buffer import GradientBuffer, Reduction
from nanomt.parallel.data_parallel.memory_accounting import storage_bytes
from nanomt.parallel.data_parallel.param_gather import OverlappedParamGather
from nanomt.parallel.data_parallel.reductions_in_flight import BoundedReductionsInFlight
from nanomt.parallel.data_parallel.stage3 import ParameterGatherer, free_params, plan_by_layer
from nanomt.parallel.data_parallel.zero3_prefetch import PrefetchingGatherer
from nanomt.parallel.deferred_init import InitialValues


class AllReduceBuffer(GradientBuffer, stage=0):
    """ZeRO-0, plain data parallelism: every rank reduces and updates everything."""

    shards_over_dp = False

    def _allocate_grads(self, b: Bucket) -> None:
        b.grad_buffer = torch.zeros(b.padded_numel, dtype=self.grad_dtype(b),
                                    device=b.param_buffer.device)
        b.grad_shard = b.shard_of(b.grad_buffer)  # the whole buffer here; my slice at ZeRO-1

    def _reduce(self, b: Bucket) -> Reduction:
        for param in self._zero_unfilled(b, b.grad_buffer):
            if b.grads_are_views:  # reads zero, as the others read their sums
                param.grad = self._slot(b, b.grad_buffer, param)
        if self.dp == 1:
            return Reduction(b, None, b.grad_buffer)
        b.grad_buffer.div_(self.dp)
        return Reduction(b, self._collective(b), b.grad_buffer)

    def _collective(self, b: Bucket) -> dist.Work | None:
        return comm.all_reduce_async(b.grad_buffer, b.group)


class Zero1Buffer(OverlappedParamGather, AllReduceBuffer, stage=1):
    """ZeRO-1 (P_os): only my shard of the full gradient buffer needs the sum."""

    shards_over_dp = True
    gathers_params_after_step = True

    def _collective(self, b: Bucket) -> dist.Work | None:
        return comm.reduce_scatter_into(b.grad_shard, b.grad_buffer, b.group, async_op=True)


class Zero2Buffer(OverlappedParamGather, BoundedReductionsInFlight, GradientBuffer, stage=2):
    """ZeRO-2 (P_os+g): a full buffer lives from its bucket's first gradient until its
    reduce-scatter into my shard is done (reductions_in_flight.py bounds how many wait)."""

    gathers_params_after_step = True

    def _allocate_grads(self, b: Bucket) -> None:
        b.grad_shard = torch.zeros(b.shard_numel, dtype=self.grad_dtype(b),
                                   device=b.param_buffer.device)

    def zero_grad(self, set_to_none: bool = True, num_microbatches: int | None = None) -> None:
        for b in self.buckets:
            b.grad_buffer = None  # grad_shard: written by the step's reduce-scatter
        super().zero_grad(set_to_none, num_microbatches)

    def _full_grad_buffer(self, b: Bucket) -> torch.Tensor:
        """Not zeroed: first gradients are copied in, unfilled slots zeroed at the end."""
        if b.grad_buffer is None:
            self._retire_completed()
            b.grad_buffer = torch.empty(b.padded_numel, dtype=self.grad_dtype(b),
                                        device=b.grad_shard.device)
            self._count_grad_bytes(storage_bytes(b.grad_buffer))
        return b.grad_buffer

    def _reduce(self, b: Bucket) -> Reduction:
        full, b.grad_buffer = self._full_grad_buffer(b), None
        self._zero_unfilled(b, full)
        for param in b.params:
            param.grad = None  # no view may outlive the buffer
        self._make_room(storage_bytes(full))
        if self.dp > 1:
            full.div_(self.dp)
        return self._reduce_scatter(b, full)

    def _reduce_scatter(self, b: Bucket, full: torch.Tensor) -> Reduction:
        """The step's reduction writes my shard directly."""
        work = comm.reduce_scatter_into(b.grad_shard, full, b.group, async_op=True)
        return Reduction(b, work, full)

    def _start_reduction(self, b: Bucket, final: bool) -> None:
        super()._start_reduction(b, final)
        if self.final_launches == len(self.buckets):  # backward is over: keep only shards
            self._wait_for_reductions()

    def _retire(self, r: Reduction) -> None:
        super()._retire(r)
        self._count_grad_bytes(-storage_bytes(r.full))


class Zero3Buffer(Zero2Buffer, stage=3):
    """ZeRO-3 (P_os+g+p): as ZeRO-2, and the parameters too persist only as my shard."""

    gathers_params_after_step = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.zero3_prefetch > 0:
            self.gatherer = PrefetchingGatherer(self.chunks, self.buckets, self.zero3_prefetch)
        else:
            self.gatherer = ParameterGatherer(self.chunks, self.buckets)

    def _plan(self, named: list[tuple[str, nn.Parameter]]) -> list[tuple[list, nn.Module]]:
        return plan_by_layer(self.chunks, self.names, self.shared_embedding_params())

    @torch.no_grad()
    def _allocate(self, b: Bucket, initial_values: InitialValues | None) -> None:
        super()._allocate(b, initial_values)
        b.param_shard = b.shard_of(b.param_buffer).clone()
        free_params(b)

    def own_param_shard(self, b: Bucket) -> torch.Tensor:
        return b.param_shard

    def release_prefetched(self) -> None:
        if self.gatherer is not None:  # None while __init__ runs
            self.gatherer.release_prefetched()
