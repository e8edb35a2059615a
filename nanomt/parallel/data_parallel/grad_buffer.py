"""The gradient buffer: where parameters and gradients live, and their average over dp.

At every ZeRO stage the buffer lays the parameters out in flat buckets (buckets.py), adds each
gradient into its bucket as backward produces it (a post-accumulate-grad hook counts arrivals,
so any schedule works), and reduces a bucket,

    g <- (1/N_d) sum_r g_r   over the ranks r of the bucket's group, N_d = dp * cp,

as soon as all its parameters have their last gradient of the step, overlapped with the rest
of backward; after the optimizer's update it makes every rank's parameters whole again. The
group is grad_sync_group, or expert_dp_group for experts' weights, still divided by dp * cp:
my ep group's tokens that reached my experts were all computed here, so the sum over
expert_dp_group already covers every rank's tokens (docs/moe.md). Which collective, and which
buffers persist, is the stage's (zero_stages.py). A first gradient is copied into its slot; if
the dtypes agree `param.grad` becomes a view of the slot, so autograd adds the later
micro-batches there in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from nanomt.parallel import comm
from nanomt.parallel.data_parallel.buckets import Bucket, is_expert, make_bucket, plan_by_size
from nanomt.parallel.data_parallel.memory_accounting import GradientMemoryMeter
from nanomt.parallel.deferred_init import InitialValues
from nanomt.parallel.pipeline.partition import shared_embedding_params

if TYPE_CHECKING:
    from nanomt.parallel.data_parallel.stage3 import ParameterGatherer
    from nanomt.parallel.grid import ParallelGrid


@dataclass
class Reduction:
    """One bucket's reduction in flight: `work` (None on a group of one) reduces `full`."""

    bucket: Bucket
    work: dist.Work | None
    full: torch.Tensor
    adds_to_shard: bool = False  # grad_reduce=microbatch's later rounds (microbatch_reduce.py)


class GradientBuffer(GradientMemoryMeter):
    """`GradientBuffer(chunks, grid, zero_stage=s, ...)` builds the class of stage s."""

    stage: int
    shards_over_dp = True  # ZeRO-1..3 split every bucket over its group; ZeRO-0 does not
    gathers_params_after_step = False  # ZeRO-1/2: each rank updated only its shard
    _class_for: dict[tuple[int, bool], type[GradientBuffer]] = {}

    def __init_subclass__(cls, stage: int | None = None, every_microbatch: bool = False,
                          **kwargs):
        super().__init_subclass__(**kwargs)
        if stage is not None:
            cls.stage = stage
            GradientBuffer._class_for[(stage, every_microbatch)] = cls

    def __new__(cls, *args, zero_stage: int, grad_reduce: str = "step", **kwargs):
        if cls is GradientBuffer:
            every_microbatch = zero_stage >= 2 and grad_reduce == "microbatch"
            cls = GradientBuffer._class_for[(zero_stage, every_microbatch)]
        return super().__new__(cls)

    def __init__(self, chunks: list[nn.Module], grid: ParallelGrid | None, *, zero_stage: int,
                 num_microbatches: int, bucket_size_mb: float = 25.0, fp32_grads: bool = True,
                 grad_reduce: str = "step", zero3_prefetch: int = 1,
                 reduce_in_flight_mb: float | None = None, overlap_param_gather: bool = False,
                 initial_values: InitialValues | None = None):
        """Options: the config's `parallel.*` keys (checked there); initial_values: a model
        built on the meta device, drawn into its buckets (deferred_init.py)."""
        self.chunks, self.grid = list(chunks), grid
        self.bucket_size_mb, self.fp32_grads = bucket_size_mb, fp32_grads
        self.zero3_prefetch = zero3_prefetch
        self.in_flight_limit = int((reduce_in_flight_mb or bucket_size_mb) * 2**20)
        self.dp_group = grid.grad_sync_group if grid is not None else None  # dp x cp
        self.dp_rank, self.dp = comm.rank_and_size(self.dp_group)
        expert_dp_group = grid.expert_dp_group if grid is not None else None
        self.gatherer: ParameterGatherer | None = None  # ZeRO-3 (stage3.py)

        named = [(f"{chunk_index}.{name}", param) for chunk_index, chunk in enumerate(self.chunks)
                 for name, param in chunk.named_parameters() if param.requires_grad]
        self.names = {id(param): name for name, param in named}
        self.shared_ids = {id(p) for p in self.shared_embedding_params()}
        self.buckets = []
        for index, (params, owner) in enumerate(self._plan(named)):
            group = expert_dp_group if is_expert(params[0][1]) else self.dp_group
            self.buckets.append(make_bucket(index, params, group, self.shards_over_dp, owner))
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.offset_of = {id(p): offset for b in self.buckets
                          for p, offset in zip(b.params, b.offsets)}
        for b in self.buckets:
            self._allocate(b, initial_values)
            for param in b.params:
                param.register_post_accumulate_grad_hook(self._on_grad_ready)
        self.in_flight: list[Reduction] = []
        self.zero_grad(num_microbatches=num_microbatches)

    # ---- layout ------------------------------------------------------------------------------
    def _plan(self, named: list[tuple[str, nn.Parameter]]) -> list[tuple[list, nn.Module | None]]:
        """Which parameters share a bucket: about bucket_size_mb each, in backward order."""
        return plan_by_size(named, self.bucket_size_mb, self.shared_embedding_params())

    def grad_dtype(self, bucket: Bucket) -> torch.dtype:
        """Gradients are accumulated and reduced in fp32 unless train.fp32_grads=false."""
        return torch.float32 if self.fp32_grads else bucket.dtype

    @torch.no_grad()
    def _allocate(self, b: Bucket, initial_values: InitialValues | None) -> None:
        """Move the parameters into a flat buffer; the stage makes the gradient memory."""
        b.param_buffer = torch.zeros(b.padded_numel, dtype=b.dtype, device=b.params[0].device)
        for param, offset in zip(b.params, b.offsets):
            view = b.param_buffer[offset: offset + param.numel()]
            view.copy_((param if initial_values is None else initial_values(param)).reshape(-1))
            param.data = view.view_as(param)
        # Not the tied embedding's: finalize_grads sums it, the pipeline engine must not.
        b.grads_are_views = (self.grad_dtype(b) == b.dtype
                             and id(b.params[0]) not in self.shared_ids)
        self._allocate_grads(b)

    def _allocate_grads(self, b: Bucket) -> None:
        raise NotImplementedError  # each stage's class

    def _slot(self, b: Bucket, flat: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """`param`'s place in a full flat buffer of bucket b, in its shape."""
        offset = self.offset_of[id(param)]
        return flat[offset: offset + param.numel()].view_as(param)

    # ---- backward: accumulate, and reduce each bucket once its gradients are complete ------
    def zero_grad(self, set_to_none: bool = True, num_microbatches: int | None = None) -> None:
        """Start a step of `num_microbatches` backward passes (kept until changed); every
        `param.grad` is None until its first gradient (set_to_none: torch.optim's signature)."""
        if num_microbatches is not None:
            self.num_microbatches = int(num_microbatches)
        self._wait_for_reductions()  # a step abandoned mid-backward
        self.release_prefetched()
        for b in self.buckets:
            for param in b.params:
                param.grad = None
            b.filled.clear()
            b.pending, b.rounds_launched, b.final_launched = len(b.params), 0, False
        self.arrivals = {id(p): 0 for b in self.buckets for p in b.params}
        self.final_launches = 0
        self.grads_synced = False
        self.grad_bytes_now = self.peak_grad_bytes = self.memory()["grads"]

    @torch.no_grad()
    def _on_grad_ready(self, param: nn.Parameter) -> None:
        b = self.bucket_of[id(param)]
        count = self.arrivals[id(param)] + 1
        if count > self.num_microbatches or b.final_launched:
            raise RuntimeError(
                f"gradient {count} of {self.names[id(param)]} arrived in a step of "
                f"{self.num_microbatches} micro-batches, after its bucket's reduction started; "
                f"call optimizer.zero_grad(num_microbatches=...) with the step's backward passes")
        self.arrivals[id(param)] = count
        self._accumulate(b, param)
        if count == self._round_target(b):
            b.pending -= 1
            if b.pending == 0:
                self._start_reduction(b, final=count == self.num_microbatches)

    def _accumulate(self, b: Bucket, param: nn.Parameter) -> None:
        """Put `param.grad` into its slot of the bucket's full buffer."""
        if b.grads_are_views and id(param) in b.filled:
            return  # param.grad is the slot: autograd has added into it
        slot = self._slot(b, self._full_grad_buffer(b), param)
        if id(param) in b.filled:
            slot.add_(param.grad)
        else:
            slot.copy_(param.grad)
            b.filled.add(id(param))
        param.grad = slot if b.grads_are_views else None

    def _full_grad_buffer(self, b: Bucket) -> torch.Tensor:
        return b.grad_buffer

    def _round_target(self, b: Bucket) -> int:
        """Arrivals that complete a parameter for its bucket's next reduction."""
        return self.num_microbatches

    def _zero_unfilled(self, b: Bucket, full: torch.Tensor) -> list[nn.Parameter]:
        """Zero the padding and the slots without a gradient this round; return their params."""
        full[b.numel:].zero_()
        unfilled = [p for p in b.params if id(p) not in b.filled]
        for param in unfilled:
            self._slot(b, full, param).zero_()
        return unfilled

    def _start_reduction(self, b: Bucket, final: bool) -> None:
        b.rounds_launched += 1
        if final:
            b.final_launched = True
            self.final_launches += 1
        self.in_flight.append(self._reduce(b))
        b.filled.clear()  # the next round (grad_reduce=microbatch) starts empty

    def _reduce(self, b: Bucket) -> Reduction:
        raise NotImplementedError  # each stage's class: launch the collective

    def _retire(self, r: Reduction) -> None:
        """Wait for one reduction (stages that free or add something extend this)."""
        if r.work is not None:
            comm.note_operation("wait for the gradients' reduction", r.bucket.group)
            r.work.wait()

    def _wait_for_reductions(self) -> None:
        while self.in_flight:
            self._retire(self.in_flight.pop(0))

    @torch.no_grad()
    def finish_grad_sync(self) -> bool:
        """Launch what a parameter without gradient held back; wait for every reduction. Once a
        step: False, doing nothing, when called again before zero_grad()."""
        if self.grads_synced:
            return False
        for b in self.buckets:
            if not b.final_launched:
                self._start_reduction(b, final=True)
        self._wait_for_reductions()
        self.grads_synced = True
        return True

    # ---- after the update: every rank's parameters whole again -------------------------------
    def own_param_shard(self, b: Bucket) -> torch.Tensor:
        """The elements of bucket b's parameters this rank updates (all of them at ZeRO-0)."""
        return b.shard_of(b.param_buffer)

    @torch.no_grad()
    def publish_params(self, updated: list[torch.Tensor]) -> None:
        """Write each bucket's updated shard into the model; at ZeRO-1/2 all-gather them."""
        self.wait_for_params()
        for b, shard in zip(self.buckets, updated):
            own = self.own_param_shard(b)
            if own.data_ptr() != shard.data_ptr():
                own.copy_(shard)
        if self.gathers_params_after_step and self.dp > 1:
            self._all_gather_params()

    def _all_gather_params(self) -> None:
        """All-gather each bucket in place (my shard is already my slot of the output)."""
        works = [comm.all_gather_into(b.param_buffer, self.own_param_shard(b), b.group,
                                      async_op=True) for b in self.buckets]
        comm.note_operation("wait for all_gather (parameters)", self.dp_group)
        for work in works:
            if work is not None:  # None: a bucket whose group has one rank
                work.wait()

    def wait_for_params(self) -> None:
        """Wait for the gathers a step left in flight (param_gather.py), before reading the
        parameters outside a forward or writing the shards."""

    def release_prefetched(self) -> None:
        """ZeRO-3: wait for and free every unclaimed prefetch (before the shards change)."""

    def local_grad_shards(self) -> list[torch.Tensor]:
        """This rank's reduced gradient shard of every bucket (valid after finish_grad_sync)."""
        return [b.grad_shard for b in self.buckets]

    def shared_embedding_params(self) -> list[nn.Parameter]:
        """The tied embedding gets its own bucket when a second copy lives on another stage."""
        if self.grid is None or comm.group_size(self.grid.embedding_group) == 1:
            return []
        return shared_embedding_params(self.chunks)
