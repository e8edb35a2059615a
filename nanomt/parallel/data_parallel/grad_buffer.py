"""The gradient buffer: data parallelism's half of a step, apart from the optimizer.

Data parallelism (with ZeRO's sharding, Rajbhandari et al. 2019) owns where parameters and
gradients live and how gradients are averaged over the dp group; the optimizer (nanomt.optim.
sharded_adamw) only updates the shard it is given. As Megatron-core's DistributedDataParallel +
_ParamAndGradBuffer, the buffer here

    lays the parameters out in flat buckets (buckets.py), each split into dp equal shards;
    accumulates each parameter's gradient into its bucket as backward produces it. When the
    gradient dtype is the parameter's, `param.grad` becomes a view of the flat buffer, so
    autograd adds into it in place and nothing is allocated per micro-batch (Megatron's
    main_grad): at stages 0-1 from the step's first gradient, which the hook copies in (the
    buffer is never zeroed: a copy is one pass where zeroing + adding is two), at stages 2-3
    while the bucket's full buffer exists (from the round's first gradient, which the hook
    adds in, to the reduce-scatter); otherwise a post-accumulate-grad hook adds `param.grad`
    in and drops it. The
    hook counts arrivals per parameter, so any schedule works unchanged;
    reduces a bucket when every parameter in it has delivered its gradient for the step, i.e.
    during the last micro-batch's backward, overlapped with the rest of it. Per step and rank,
    with Psi the parameter count and the paper's convention (an all-reduce moves 2 Psi, a
    reduce-scatter or an all-gather Psi; section 7):

        stage 0   all-reduce (async, in place)                                   2 Psi
        stage 1   reduce-scatter in place into my shard of the full buffer       Psi
                  + the optimizer's all-gather of the updated parameters, in
                    place (my shard is already its slot of the output, as FSDP2's) Psi
        stage 2   reduce-scatter of a full buffer that exists only while the
                  bucket's gradients arrive; my shard is kept                    Psi + Psi
        stage 3   the same, + two all-gathers of the parameters (stage3.py)      3 Psi

    independent of the number of micro-batches m (parallel.grad_reduce=step, the default).
    parallel.grad_reduce=microbatch (ZeRO-2/3, opt-in) trades traffic for memory, as
    DeepSpeed's ZeRO-2: a reduce-scatter after every micro-batch, so only the shard survives
    between micro-batches (gradients g Psi / N_d through the accumulation instead of g Psi),
    at m Psi of gradient traffic per step instead of Psi.
    Several ZeRO-2/3 reduce-scatters may be in flight: their full buffers are bounded by
    parallel.reduce_in_flight_mb (default: one bucket); launching past the bound first waits
    for the oldest. On NCCL a wait only orders the compute stream after the reduction's
    stream; the host does not block.
    gathers ZeRO-3's parameter shards around each layer (stage3.py), and publishes updated
    shards back to every rank (all-gather at ZeRO-1/2; with parallel.overlap_param_gather
    waited for in the next forward, param_gather.py).

bf16/fp16 gradients are accumulated and reduced in fp32 by default (train.fp32_grads, as
Megatron's main_grad). After the schedule, `finalize_grads` (finalize.py) waits for the
reductions and adds the sums other groups owe; then the optimizer clips and steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from nanomt.parallel import comm
from nanomt.parallel.data_parallel.buckets import (
    Bucket,
    free_params,
    make_bucket,
    plan_by_layer,
    plan_by_size,
    storage_bytes,
)
from nanomt.parallel.data_parallel.param_gather import PendingParamGathers
from nanomt.parallel.data_parallel.stage3 import ParameterGatherer
from nanomt.parallel.deferred_init import InitialValues
from nanomt.parallel.pipeline.partition import shared_embedding_params

if TYPE_CHECKING:
    from nanomt.parallel.grid import ParallelGrid

GRAD_REDUCE_MODES = ("microbatch", "step")


class GradientBuffer:
    """Flat parameter and gradient buckets of `chunks`, reduced over dp during backward."""

    def __init__(self, chunks: list[nn.Module], grid: ParallelGrid | None, *, zero_stage: int,
                 num_microbatches: int, bucket_size_mb: float = 25.0, fp32_grads: bool = True,
                 grad_reduce: str = "step", zero3_prefetch: int = 1,
                 reduce_in_flight_mb: float | None = None, overlap_param_gather: bool = False,
                 initial_values: InitialValues | None = None):
        """initial_values: parameters built on the meta device (now placeholders) are drawn
        one at a time into their bucket (nanomt.parallel.deferred_init)."""
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
        if not bucket_size_mb > 0:
            raise ValueError(f"parallel.bucket_size_mb must be > 0, got {bucket_size_mb}")
        if grad_reduce not in GRAD_REDUCE_MODES:
            raise ValueError(f"parallel.grad_reduce must be one of {GRAD_REDUCE_MODES}, "
                             f"got {grad_reduce!r}")
        self.chunks, self.grid, self.stage = list(chunks), grid, zero_stage
        self.initial_values = initial_values
        self.fp32_grads = fp32_grads
        if reduce_in_flight_mb is not None and not reduce_in_flight_mb > 0:
            raise ValueError(f"parallel.reduce_in_flight_mb must be > 0, got {reduce_in_flight_mb}")
        self.in_flight_limit = int((reduce_in_flight_mb or bucket_size_mb) * 2**20)
        # ZeRO-2/3 under "microbatch": reduce-scatter every micro-batch, keep only the shard.
        self.reduce_every_microbatch = zero_stage >= 2 and grad_reduce == "microbatch"
        self.dp_group = grid.grad_sync_group if grid is not None else None  # dp x cp
        self.dp = comm.group_size(self.dp_group)
        self.dp_rank = dist.get_rank(self.dp_group) if self.dp > 1 else 0

        self.names: dict[int, str] = {}
        named: list[tuple[str, nn.Parameter]] = []
        for chunk_index, chunk in enumerate(self.chunks):
            for name, param in chunk.named_parameters():
                if param.requires_grad:
                    self.names[id(param)] = f"{chunk_index}.{name}"
                    named.append((f"{chunk_index}.{name}", param))
        self.shared_ids = {id(p) for p in self.shared_embedding_params()}
        self.buckets = self._build_buckets(named, bucket_size_mb)
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.offset_of = {id(p): offset for b in self.buckets
                          for p, offset in zip(b.params, b.offsets)}
        self._allocate()
        self.gatherer = ParameterGatherer(self, zero3_prefetch) if zero_stage == 3 else None
        # ZeRO-1/2: the updated parameters' all-gather waited for in the next forward
        self.param_gathers = (PendingParamGathers(self.chunks, {
            id(p): b.index for b in self.buckets for p in b.params}, self.dp_group)
            if overlap_param_gather and zero_stage in (1, 2) and self.dp > 1 else None)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                       for b in self.buckets for p in b.params]
        # (b, handle, full, first): first round of the step reduce-scatters into grad_shard
        self.in_flight: list[tuple[Bucket, object, torch.Tensor, bool]] = []
        self.zero_grad(num_microbatches=num_microbatches)

    # ---- layout ------------------------------------------------------------------------------
    def _build_buckets(self, named: list[tuple[str, nn.Parameter]],
                       bucket_size_mb: float) -> list[Bucket]:
        separate = self.shared_embedding_params()
        if self.stage == 3:
            plans = plan_by_layer(self.chunks, self.names, separate)
        else:
            plans = plan_by_size(named, bucket_size_mb, separate)
        shard_world, shard_rank = (1, 0) if self.stage == 0 else (self.dp, self.dp_rank)
        return [make_bucket(index, params, shard_world, shard_rank, owner)
                for index, (params, owner) in enumerate(plans)]

    def grad_dtype(self, bucket: Bucket) -> torch.dtype:
        """Gradients are accumulated and reduced in fp32 unless train.fp32_grads=false."""
        return torch.float32 if self.fp32_grads else bucket.dtype

    @torch.no_grad()
    def _allocate(self) -> None:
        """Move parameters into flat buffers; create the gradient buffers (and ZeRO-3 shards)."""
        for b in self.buckets:
            device = b.params[0].device
            b.param_buffer = torch.zeros(b.padded_numel, dtype=b.dtype, device=device)
            for param, offset in zip(b.params, b.offsets):
                view = b.param_buffer[offset: offset + param.numel()]
                value = param if self.initial_values is None else self.initial_values(param)
                view.copy_(value.reshape(-1))
                param.data = view.view_as(param)
            if self.stage <= 1:  # full gradients, all-reduced in place; my shard is a view
                b.grad_buffer = torch.zeros(b.padded_numel, dtype=self.grad_dtype(b),
                                            device=device)
                b.grad_shard = b.shard_of(b.grad_buffer)
            else:  # only my shard persists; full buffers exist while gradients arrive
                b.grad_buffer = None
                b.grad_shard = torch.zeros(b.shard_numel, dtype=self.grad_dtype(b),
                                           device=device)
            if self.stage == 3:
                b.param_shard = b.shard_of(b.param_buffer).clone()
                free_params(b)
            b.handle = None

    def _grads_are_views(self, b: Bucket) -> bool:
        """Stages 0-1 keep the full gradient buffer: `param.grad` can be a view of it (when the
        dtypes agree), and autograd accumulates there in place. Not for the tied embedding's
        bucket: the pipeline engine sums a `.grad` it finds over the embedding group, which
        finalize_grads does here."""
        return (self.stage <= 1 and self.grad_dtype(b) == b.dtype
                and id(b.params[0]) not in self.shared_ids)

    def _bind_grad_views(self, b: Bucket) -> None:
        """At a step's start every `.grad` is None: autograd hands the first gradient over
        whole, and the hook copies it into the buffer (one pass instead of zeroing + adding)."""
        for param in b.params:
            param.grad = None
        b.viewing = set()  # ZeRO-2/3: parameters whose .grad is now a view of the full buffer

    def _grad_view(self, b: Bucket, param: nn.Parameter) -> torch.Tensor:
        offset = self.offset_of[id(param)]
        return b.grad_buffer[offset: offset + param.numel()].view_as(param)

    def _view_full_buffer(self, b: Bucket, params: list[nn.Parameter]) -> None:
        """ZeRO-2/3: the rest of this round's gradients of `params` land in the full buffer."""
        if self.grad_dtype(b) != b.dtype or id(b.params[0]) in self.shared_ids:
            return
        for param in params:
            offset = self.offset_of[id(param)]
            param.grad = b.grad_buffer[offset: offset + param.numel()].view_as(param)
            b.viewing.add(id(param))

    def _drop_full_buffer_views(self, b: Bucket) -> None:
        """Before the full buffer is reduced (and freed), no `.grad` may point into it."""
        for param in b.params:
            if id(param) in b.viewing:
                param.grad = None
        b.viewing = set()

    # ---- backward: accumulate, and reduce each bucket once its gradients are complete ------
    def zero_grad(self, set_to_none: bool = True, num_microbatches: int | None = None) -> None:
        """Start a new step: empty the gradient buffers and the per-parameter counters.

        num_microbatches: backward passes every parameter sees in this step (kept until changed;
        e.g. under batch-size ramp-up). set_to_none: accepted for torch.optim's signature;
        gradients live in the flat buffers here, and every `param.grad` is None until its
        first gradient of the step arrives (then a view of them: stages 0-1, same dtype).
        """
        if num_microbatches is not None:
            if num_microbatches < 1:
                raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
            self.num_microbatches = int(num_microbatches)
        self._retire_in_flight()  # a step abandoned mid-backward
        self.release_prefetched()
        for b in self.buckets:
            b.handle = None
            if self.stage >= 2:
                b.grad_buffer = None  # grad_shard: written by the step's first reduce-scatter
            elif not self._grads_are_views(b):
                b.grad_buffer.zero_()
            # else: no zeroing; each gradient's first arrival is copied in (_on_grad_ready)
            b.pending = len(b.params)
            b.rounds_launched = 0
            b.final_launched = False
            self._bind_grad_views(b)
        self.arrivals = {id(p): 0 for b in self.buckets for p in b.params}
        self.final_launches = 0
        self.grads_synced = False
        self.live_grad_bytes = self._grad_bytes_held()
        self.peak_grad_bytes = self.live_grad_bytes

    def _grad_bytes_held(self) -> int:
        total = 0
        for b in self.buckets:
            total += b.grad_shard.untyped_storage().nbytes()
            if self.stage >= 2 and b.grad_buffer is not None:
                total += b.grad_buffer.untyped_storage().nbytes()
        return total

    def _count_grad_bytes(self, delta: int) -> None:
        self.live_grad_bytes += delta
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.live_grad_bytes)

    def _full_grad_buffer(self, b: Bucket) -> torch.Tensor:
        """ZeRO-2/3: the bucket's full gradient buffer, allocated at its first use in a round.
        Not zeroed: each parameter's first gradient of the round is copied in (`b.filled`),
        and what got none is zeroed before the reduction (`_zero_unfilled`)."""
        if b.grad_buffer is None:
            self._retire_in_flight(only_completed=True)
            b.grad_buffer = torch.empty(b.padded_numel, dtype=self.grad_dtype(b),
                                        device=b.grad_shard.device)
            b.filled = set()
            self._count_grad_bytes(b.grad_buffer.untyped_storage().nbytes())
        return b.grad_buffer

    def _zero_unfilled(self, b: Bucket, full: torch.Tensor) -> None:
        """Zero the padding and the slots of parameters without a gradient in this round."""
        full[b.numel:].zero_()
        for param in b.params:
            if id(param) not in b.filled:
                offset = self.offset_of[id(param)]
                full[offset: offset + param.numel()].zero_()

    @torch.no_grad()
    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket = self.bucket_of[id(param)]
        count = self.arrivals[id(param)] + 1
        if count > self.num_microbatches or bucket.final_launched:
            raise RuntimeError(
                f"gradient {count} of {self.names[id(param)]} arrived in a step of "
                f"{self.num_microbatches} micro-batches, after its bucket's reduction started; "
                f"call optimizer.zero_grad(num_microbatches=...) with the number of backward "
                f"passes of the step")
        self.arrivals[id(param)] = count
        if self._grads_are_views(bucket):
            if count == 1:  # the step's first gradient: copy it in, then accumulate in place
                view = self._grad_view(bucket, param)
                view.copy_(param.grad)
                param.grad = view
        elif id(param) not in bucket.viewing:
            offset = self.offset_of[id(param)]  # autograd allocated param.grad: put it in
            flat = bucket.grad_buffer if self.stage <= 1 else self._full_grad_buffer(bucket)
            slot = flat[offset: offset + param.numel()]
            if self.stage >= 2 and id(param) not in bucket.filled:  # the round's first
                slot.copy_(param.grad.reshape(-1))
                bucket.filled.add(id(param))
            else:
                slot.add_(param.grad.reshape(-1))
            param.grad = None
            if self.stage >= 2:
                self._view_full_buffer(bucket, [param])
        if self.reduce_every_microbatch:
            target = bucket.rounds_launched + 1
        else:
            target = self.num_microbatches
        if count == target:
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch_reduction(bucket, final=target == self.num_microbatches)
        if self.gatherer is not None:
            self.gatherer.on_grad_ready(param)

    def _launch_reduction(self, b: Bucket, final: bool) -> None:
        """Average the bucket over dp: all-reduce (stage 0) or reduce-scatter in place, my shard
        of the full buffer receiving the sum (stages 1-3; 2-3 then keep only that shard)."""
        b.rounds_launched += 1
        next_target = b.rounds_launched + 1
        b.pending = sum(self.arrivals[id(p)] < next_target for p in b.params)
        if final:
            b.final_launched = True
            self.final_launches += 1
        if self.stage <= 1:
            self._zero_missing_grads(b)
            if self.dp > 1:
                b.grad_buffer.div_(self.dp)
                b.handle = (comm.all_reduce_async(b.grad_buffer, self.dp_group)
                            if self.stage == 0 else
                            comm.reduce_scatter_into(b.grad_shard, b.grad_buffer, self.dp_group,
                                                     async_op=True))
            return
        full, b.grad_buffer = self._full_grad_buffer(b), None
        self._zero_unfilled(b, full)
        self._drop_full_buffer_views(b)
        self._make_room(full.untyped_storage().nbytes())
        if self.dp > 1:
            full.div_(self.dp)
        first = b.rounds_launched == 1  # straight into the accumulator; later rounds add
        handle = comm.reduce_scatter_into(b.grad_shard if first else b.shard_of(full), full,
                                          self.dp_group, async_op=True)
        self.in_flight.append((b, handle, full, first))
        if self.final_launches == len(self.buckets):  # backward is over: keep only shards
            self._retire_in_flight()

    def _zero_missing_grads(self, b: Bucket) -> None:
        """A view bucket is not zeroed at the step's start: a parameter that got no gradient
        in this step still holds the last step's, zeroed here before the bucket is read."""
        if not self._grads_are_views(b):
            return
        for param in b.params:
            if self.arrivals[id(param)] == 0:
                param.grad = self._grad_view(b, param)
                param.grad.zero_()

    def _make_room(self, nbytes: int) -> None:
        """Retire the oldest reduce-scatters until `nbytes` more fit in parallel.reduce_in_flight_mb
        (one is always allowed)."""
        held = sum(entry[2].untyped_storage().nbytes() for entry in self.in_flight)
        while self.in_flight and held + nbytes > self.in_flight_limit:
            oldest = self.in_flight.pop(0)
            held -= oldest[2].untyped_storage().nbytes()
            self._retire(*oldest)

    def _retire(self, b: Bucket, handle, full: torch.Tensor, first: bool) -> None:
        """Wait for one reduce-scatter, add my shard of it into the accumulator (unless it was
        the step's first, written there), free `full`."""
        if handle is not None:
            comm.note_operation("wait for reduce_scatter (gradients)", self.dp_group)
            handle.wait()
        if not first:
            b.grad_shard.add_(b.shard_of(full))
        self._count_grad_bytes(-full.untyped_storage().nbytes())

    def _retire_in_flight(self, only_completed: bool = False) -> None:
        """Retire the reduce-scatters in flight, oldest first (or, only_completed, up to the
        first still running: a bucket's first round writes its accumulator, later ones add)."""
        while self.in_flight:
            handle = self.in_flight[0][1]
            if only_completed and handle is not None and not handle.is_completed():
                return
            self._retire(*self.in_flight.pop(0))

    @torch.no_grad()
    def finish_grad_sync(self) -> bool:
        """Wait for every bucket's reduction (launching any a parameter without gradient held
        back). Runs once per step: returns False, doing nothing, when called again before
        zero_grad(). The sums owed over other groups are `finalize_grads`' (finalize.py)."""
        if self.grads_synced:
            return False
        for b in self.buckets:
            if not b.final_launched:
                self._launch_reduction(b, final=True)
        self._retire_in_flight()
        for b in self.buckets:
            if b.handle is not None:
                comm.note_operation("wait for the gradients' reduction", self.dp_group)
                b.handle.wait()
                b.handle = None
        self.grads_synced = True
        return True

    # ---- what the optimizer and checkpoints use ---------------------------------------------
    def local_grad_shards(self) -> list[torch.Tensor]:
        """This rank's reduced gradient shard of every bucket (valid after finish_grad_sync)."""
        return [b.grad_shard for b in self.buckets]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(key, parameter) for every parameter, key = "<chunk index>.<name in the chunk>"."""
        return [(name, p) for b in self.buckets for name, p in zip(b.names, b.params)]

    def own_param_shard(self, b: Bucket) -> torch.Tensor:
        """The elements of bucket b's parameters this rank updates (all of them at ZeRO-0)."""
        return b.param_shard if self.stage == 3 else b.shard_of(b.param_buffer)

    def wait_for_params(self) -> None:
        """Every parameter complete: wait for the gathers a step left in flight (ZeRO-1/2 with
        parallel.overlap_param_gather; param_gather.py). Call before reading them outside a
        forward, and before the optimizer writes the shards again."""
        if self.param_gathers is not None:
            self.param_gathers.wait_all()

    @torch.no_grad()
    def publish_params(self, updated: list[torch.Tensor]) -> None:
        """Write each bucket's updated shard (fp32 masters or the parameters themselves) into
        the model's dtype and let every rank see all of it: all-gather at ZeRO-1/2 (ZeRO-0
        updated everything; ZeRO-3 gathers at use). With overlap_param_gather the gathers are
        left in flight for the next forward's hooks."""
        self.wait_for_params()
        for b, shard in zip(self.buckets, updated):
            own = self.own_param_shard(b)
            if own.data_ptr() != shard.data_ptr():
                own.copy_(shard)
        if self.stage not in (1, 2) or self.dp == 1:
            return
        if self.param_gathers is not None:  # left in flight, first-needed first
            for index in self.param_gathers.launch_order(len(self.buckets)):
                b = self.buckets[index]
                self.param_gathers.launch(index, comm.all_gather_into(
                    b.param_buffer, self.own_param_shard(b), self.dp_group, async_op=True))
            return
        handles = [comm.all_gather_into(b.param_buffer, self.own_param_shard(b), self.dp_group,
                                        async_op=True) for b in self.buckets]
        comm.note_operation("wait for all_gather (parameters)", self.dp_group)
        for handle in handles:
            handle.wait()

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds now for parameters and gradients (in flight included)."""
        params = grads = 0
        for b in self.buckets:
            params += storage_bytes(b.param_buffer)
            if self.stage == 3:
                params += storage_bytes(b.param_shard)
            if b.grad_buffer is not None:
                grads += storage_bytes(b.grad_buffer)
            if self.stage >= 2:
                grads += storage_bytes(b.grad_shard)  # at stages 0-1, a view of grad_buffer
        for entry in self.in_flight:
            grads += storage_bytes(entry[2])
        return {"params": params, "grads": grads}

    def release_prefetched(self) -> None:
        """ZeRO-3: wait for and free every unclaimed prefetch (before the shards change)."""
        if self.gatherer is not None:
            self.gatherer.release_prefetched()

    def shared_embedding_params(self) -> list[nn.Parameter]:
        """The tied embedding gets its own bucket when a second copy lives on another stage."""
        if self.grid is None or comm.group_size(self.grid.embedding_group) == 1:
            return []
        return shared_embedding_params(self.chunks)
