"""ZeroOptimizer: data parallelism with ZeRO-sharded optimizer state, gradients and parameters.

ZeRO (Rajbhandari et al. 2019, section 5 and figure 1) removes the redundancy of plain data
parallelism. With Psi parameters, N_d ranks and mixed-precision Adam (2 bytes param + 2 grad +
K = 12 optimizer state), the model-state bytes per rank are

    stage 0  (2 + 2 + K) Psi            all-reduce the gradients, every rank updates everything
    stage 1  (2 + 2) Psi + K Psi / N_d  each rank updates only its shard, then all-gathers params
    stage 2  2 Psi + (2 + K) Psi / N_d  gradients reduce-scattered: keep only my shard's
    stage 3  (2 + 2 + K) Psi / N_d      parameters sharded too, gathered per layer when used

nanomt accumulates and reduces bf16/fp16 gradients in fp32 by default (train.fp32_grads, as
Megatron's main_grad), so its gradient term is 4 bytes: stage 2 holds 2 Psi + (4 + K) Psi / N_d.

One step, seen from a rank:
  backward    each parameter's gradient is added into its bucket's flat gradient buffer by a
              post-accumulate-grad hook, which counts arrivals per parameter. A bucket is
              reduced when every parameter in it has delivered its gradient:
                stage 0, 1   all-reduce (async) in place, once per step, after the last micro-batch
                stage 2, 3   reduce-scatter (async) into a fresh shard; when it completes, my
                             shard is added into an fp32 accumulator of 1/N_d of the bucket and
                             the full buffer is freed. parallel.grad_reduce chooses when:
                  "microbatch" (default): after every micro-batch, as DeepSpeed's ZeRO-2. Only
                             the shard survives between micro-batches: the gradient term stays
                             g Psi / N_d for any accumulation, at m reduce-scatters per step.
                  "step":    once, after the last micro-batch: one reduce-scatter per step, but
                             full gradient buffers live through the accumulation (g Psi until
                             the end of backward, g Psi / N_d from then until step()).
              At most one reduce-scatter is in flight: launching the next one waits for it and
              frees its buffer (one already complete is freed as soon as a new buffer is
              needed). Counting arrivals per parameter needs no "last micro-batch" flag from
              the schedule, so accumulation, 1F1B and interleaved 1F1B all work unchanged.
  step()      finish_grad_sync: wait for the reductions; add the sums other groups owe
              (sequence-parallel gradients over tp, the tied embedding over the embedding group);
              unscale (fp16); global grad norm and overflow flag, agreed over the world; clip;
              AdamW on my fp32 shard; publish the new weights (all-gather for 1-2; ZeRO-3 gathers
              at use).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from nanomt.memory import optimizer_memory
from nanomt.optim.adamw import adamw_update_, decays
from nanomt.optim.grad_norm import norm_and_overflow
from nanomt.optim.loss_scaler import DynamicLossScaler, ScaleGradient
from nanomt.parallel import comm
from nanomt.parallel.pipeline.partition import shared_embedding_params
from nanomt.parallel.zero import state
from nanomt.parallel.zero.buckets import Bucket, make_bucket, plan_by_layer, plan_by_size
from nanomt.parallel.zero.stage3 import ParameterGatherer

if TYPE_CHECKING:
    from nanomt.parallel.grid import ParallelGrid

GRAD_REDUCE_MODES = ("microbatch", "step")


@dataclass
class StepResult:
    grad_norm: float   # global norm of the (unscaled) gradient before clipping
    skipped: bool      # True when an inf/nan gradient made every rank skip the update
    loss_scale: float  # the scale that was used for this step's backward (1.0 unless fp16)


class ZeroOptimizer:
    """AdamW over flat shards for the parameters of `chunks` (one or more model chunks)."""

    def __init__(self, chunks: list[nn.Module], grid: ParallelGrid | None, *, zero_stage: int,
                 lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 grad_clip: float, num_microbatches: int, bucket_size_mb: float = 25.0,
                 master_params: dict[int, torch.Tensor] | None = None,
                 loss_scaler: DynamicLossScaler | None = None, fp32_grads: bool = True,
                 grad_reduce: str = "microbatch", zero3_prefetch: int = 1):
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
        if not bucket_size_mb > 0:
            raise ValueError(f"parallel.bucket_size_mb must be > 0, got {bucket_size_mb}")
        if grad_reduce not in GRAD_REDUCE_MODES:
            raise ValueError(f"parallel.grad_reduce must be one of {GRAD_REDUCE_MODES}, "
                             f"got {grad_reduce!r}")
        self.chunks, self.grid, self.stage = list(chunks), grid, zero_stage
        self.betas, self.eps = betas, eps
        self.weight_decay, self.grad_clip = weight_decay, grad_clip
        self.loss_scaler = loss_scaler
        self.fp32_grads = fp32_grads
        # ZeRO-2/3 under "microbatch": reduce-scatter every micro-batch, keep only the shard.
        self.reduce_every_microbatch = zero_stage >= 2 and grad_reduce == "microbatch"
        self.dp_group = grid.dp_group if grid is not None else None
        self.dp = comm.group_size(self.dp_group)
        self.dp_rank = dist.get_rank(self.dp_group) if self.dp > 1 else 0
        # The same two groups as torch.optim.AdamW built by nanomt.optim.adamw.parameter_groups;
        # the train loop sets "lr" here every step.
        self.param_groups = [{"lr": lr, "weight_decay": weight_decay},
                             {"lr": lr, "weight_decay": 0.0}]
        self.step_count = 0
        self.reductions_launched = 0  # collectives launched for gradients (tests count them)
        self.memory_after_backward: dict[str, int] = {}  # model-state bytes at the step's peak

        self.names: dict[int, str] = {}
        named: list[tuple[str, nn.Parameter]] = []
        for chunk_index, chunk in enumerate(self.chunks):
            for name, param in chunk.named_parameters():
                if param.requires_grad:
                    self.names[id(param)] = f"{chunk_index}.{name}"
                    named.append((f"{chunk_index}.{name}", param))
        self.buckets = self._build_buckets(named, bucket_size_mb)
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.offset_of = {id(p): offset for b in self.buckets
                          for p, offset in zip(b.params, b.offsets)}
        self._allocate(master_params or {})
        self.gatherer = ParameterGatherer(self, zero3_prefetch) if zero_stage == 3 else None
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                       for b in self.buckets for p in b.params]
        self.in_flight: list[tuple[Bucket, object, torch.Tensor, torch.Tensor]] = []
        self.zero_grad(num_microbatches=num_microbatches)

    # ---- layout ------------------------------------------------------------------------------
    def _shared_embedding_params(self) -> list[nn.Parameter]:
        """The tied embedding gets its own bucket when a second copy lives on another stage."""
        if self.grid is None or comm.group_size(self.grid.embedding_group) == 1:
            return []
        return shared_embedding_params(self.chunks)

    def _build_buckets(self, named: list[tuple[str, nn.Parameter]],
                       bucket_size_mb: float) -> list[Bucket]:
        separate = self._shared_embedding_params()
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
    def _allocate(self, master_params: dict[int, torch.Tensor]) -> None:
        """Move parameters into flat buffers; create gradient buffers, fp32 masters, moments."""
        for b in self.buckets:
            device = b.params[0].device
            b.param_buffer = torch.zeros(b.padded_numel, dtype=b.dtype, device=device)
            master_full = torch.zeros(b.padded_numel, dtype=torch.float32, device=device)
            for param, offset in zip(b.params, b.offsets):
                view = b.param_buffer[offset: offset + param.numel()]
                view.copy_(param.reshape(-1))
                fp32 = master_params.get(id(param), param)  # the fp32 init, before any cast
                master_full[offset: offset + param.numel()].copy_(fp32.reshape(-1))
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
                b.param_buffer.untyped_storage().resize_(0)
                b.gathered = False
            own_params = b.param_shard if self.stage == 3 else b.shard_of(b.param_buffer)
            # fp32 training: the parameters themselves are the master weights.
            b.master = own_params if b.dtype == torch.float32 else b.shard_of(master_full).clone()
            b.exp_avg = torch.zeros(b.shard_numel, dtype=torch.float32, device=device)
            b.exp_avg_sq = torch.zeros(b.shard_numel, dtype=torch.float32, device=device)
            b.handle = None

    # ---- backward: accumulate, and reduce each bucket once its gradients are complete ------
    def zero_grad(self, set_to_none: bool = True, num_microbatches: int | None = None) -> None:
        """Start a new step: empty the gradient buffers and the per-parameter counters.

        num_microbatches: backward passes every parameter sees in this step (kept until changed;
        e.g. under batch-size ramp-up). set_to_none: accepted for torch.optim's signature;
        gradients live in the flat buffers here, and every `param.grad` is always left None.
        """
        if num_microbatches is not None:
            if num_microbatches < 1:
                raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
            self.num_microbatches = int(num_microbatches)
        self._retire_in_flight()  # a step abandoned mid-backward
        if self.gatherer is not None:
            self.gatherer.release_prefetched()
        for b in self.buckets:
            b.handle = None
            if self.stage <= 1:
                b.grad_buffer.zero_()
            else:
                b.grad_buffer = None
                b.grad_shard.zero_()
            b.pending = len(b.params)
            b.rounds_launched = 0
            b.final_launched = False
            for param in b.params:
                param.grad = None
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
        """ZeRO-2/3: the bucket's full gradient buffer, allocated at its first use in a round."""
        if b.grad_buffer is None:
            self._retire_in_flight(only_completed=True)
            b.grad_buffer = torch.zeros(b.padded_numel, dtype=self.grad_dtype(b),
                                        device=b.grad_shard.device)
            self._count_grad_bytes(b.grad_buffer.untyped_storage().nbytes())
        return b.grad_buffer

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
        offset = self.offset_of[id(param)]
        flat = bucket.grad_buffer if self.stage <= 1 else self._full_grad_buffer(bucket)
        flat[offset: offset + param.numel()].add_(param.grad.reshape(-1))
        param.grad = None
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
        """Average the bucket over dp: all-reduce (0, 1) or reduce-scatter into my shard (2, 3)."""
        b.rounds_launched += 1
        next_target = b.rounds_launched + 1
        b.pending = sum(self.arrivals[id(p)] < next_target for p in b.params)
        if final:
            b.final_launched = True
            self.final_launches += 1
        if self.dp > 1:
            self.reductions_launched += 1
        if self.stage <= 1:
            if self.dp > 1:
                b.grad_buffer.div_(self.dp)
                comm.note_operation("all_reduce (gradients)", self.dp_group)
                b.handle = dist.all_reduce(b.grad_buffer, group=self.dp_group, async_op=True)
            return
        self._retire_in_flight()  # one reduce-scatter in flight at a time: free the last one
        full, b.grad_buffer = self._full_grad_buffer(b), None
        if self.dp > 1:
            full.div_(self.dp)
        reduced = torch.empty(b.shard_numel, dtype=full.dtype, device=full.device)
        self._count_grad_bytes(reduced.untyped_storage().nbytes())
        handle = comm.reduce_scatter_into(reduced, full, self.dp_group, async_op=True)
        self.in_flight.append((b, handle, full, reduced))
        if self.final_launches == len(self.buckets):  # backward is over: keep only shards
            self._retire_in_flight()

    def _retire_in_flight(self, only_completed: bool = False) -> None:
        """Wait for the reduce-scatters in flight (or, only_completed, take those already done);
        add my shard into the accumulator and free the full buffers."""
        still_running = []
        for b, handle, full, reduced in self.in_flight:
            if handle is not None:
                if only_completed and not handle.is_completed():
                    still_running.append((b, handle, full, reduced))
                    continue
                comm.note_operation("wait for reduce_scatter (gradients)", self.dp_group)
                handle.wait()
            b.grad_shard.add_(reduced)
            self._count_grad_bytes(-full.untyped_storage().nbytes()
                                   - reduced.untyped_storage().nbytes())
        self.in_flight = still_running

    @torch.no_grad()
    def finish_grad_sync(self) -> None:
        """Wait for every bucket's reduction (launching any a parameter without gradient held
        back), then add the sums owed over tp (sequence parallel) and the embedding group.
        Runs once per step: a second call before zero_grad() does nothing."""
        if self.grads_synced:
            return
        for b in self.buckets:
            if not b.final_launched:
                self._launch_reduction(b, final=True)
        self._retire_in_flight()
        for b in self.buckets:
            if b.handle is not None:
                comm.note_operation("wait for all_reduce (gradients)", self.dp_group)
                b.handle.wait()
                b.handle = None
        self._sum_over_other_groups()
        self.grads_synced = True

    def _sum_over_other_groups(self) -> None:
        """Sums are linear, so they commute with the dp reduction: do them on my shard.

        Buckets have the same layout on every tp rank of a stage (equal shard shapes), and the
        tied embedding's bucket the same on the first and last stage, so shards line up."""
        if self.grid is None:
            return
        tp_group, emb_group = self.grid.tp_group, self.grid.embedding_group
        sp_pieces = [b.grad_shard[s.shard_lo: s.shard_hi] for b in self.buckets
                     for s in b.segments if getattr(s.param, "sequence_parallel", False)]
        comm.all_reduce_coalesced(sp_pieces, tp_group)
        if comm.group_size(emb_group) > 1:
            for param in self._shared_embedding_params():
                comm.all_reduce(self.bucket_of[id(param)].grad_shard, emb_group)

    # ---- the update ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepResult:
        """Reduce, unscale, clip by the global norm and update. Returns norm and skip flag."""
        if self.gatherer is not None:  # no gather may read a shard while it is updated
            self.gatherer.release_prefetched()
        # Gradients complete, nothing freed yet: the step's peak of model-state memory.
        self.memory_after_backward = {**optimizer_memory(self),
                                      "grads_peak_in_backward": self.peak_grad_bytes}
        self.finish_grad_sync()
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        grads = [b.grad_shard.float() for b in self.buckets]  # fp32 (a copy only if not already)
        if scale != 1.0:
            for grad in grads:
                grad.mul_(1.0 / scale)
        pieces = [(s.param, grad[s.shard_lo: s.shard_hi])
                  for b, grad in zip(self.buckets, grads) for s in b.segments]
        # At ZeRO-0 every dp replica holds the same gradients: dp rank 0 counts them.
        norm, overflow = norm_and_overflow(pieces, self.grid, self.dp_group,
                                           count_squares=self.stage > 0 or self.dp_rank == 0)
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow)
        if overflow:
            self.zero_grad()
            return StepResult(float(norm), True, scale)
        if self.grad_clip > 0:
            coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            for grad in grads:
                grad.mul_(coef)
        self.step_count += 1
        for b, grad in zip(self.buckets, grads):
            self._update_bucket(b, grad)
        self._publish_params()
        self.zero_grad()
        return StepResult(float(norm), False, scale)

    def _update_bucket(self, b: Bucket, grad: torch.Tensor) -> None:
        lr_decay, lr_flat = self.param_groups[0]["lr"], self.param_groups[1]["lr"]
        if lr_decay != lr_flat:
            raise ValueError("ZeroOptimizer updates a flat shard with one learning rate; "
                             "set the same lr in every param group")
        wd = self.param_groups[0]["weight_decay"]
        if wd != 0:
            for s in b.segments:
                if decays(s.param):
                    b.master[s.shard_lo: s.shard_hi].mul_(1 - lr_decay * wd)
        adamw_update_(b.master, grad, b.exp_avg, b.exp_avg_sq, self.step_count, lr_decay,
                      self.betas, self.eps)

    def _publish_params(self) -> None:
        """Copy my updated fp32 shard into the model's dtype and let every rank see all of it."""
        handles = []
        for b in self.buckets:
            own = b.param_shard if self.stage == 3 else b.shard_of(b.param_buffer)
            if own.data_ptr() != b.master.data_ptr():
                own.copy_(b.master)
            if self.stage in (1, 2) and self.dp > 1:
                handles.append(comm.all_gather_into(b.param_buffer, own.clone(), self.dp_group,
                                                    async_op=True))
        comm.note_operation("wait for all_gather (parameters)", self.dp_group)
        for handle in handles:
            handle.wait()

    # ---- fp16 ------------------------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss whose backward yields gradients times the loss scale (identity unless fp16)."""
        if self.loss_scaler is None:
            return loss
        return ScaleGradient.apply(loss, self.loss_scaler.scale)

    def local_grad_shards(self) -> list[torch.Tensor]:
        """This rank's reduced gradient shard of every bucket (valid after finish_grad_sync)."""
        return [b.grad_shard for b in self.buckets]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(key, parameter) for every parameter, key = "<chunk index>.<name in the chunk>"."""
        return [(name, p) for b in self.buckets for name, p in zip(b.names, b.params)]

    # ---- checkpoints (protocol: nanomt/parallel/zero/state.py) -----------------------------
    def checkpoint_state(self) -> list[tuple]:
        return state.checkpoint_state(self)

    def load_checkpoint_state(self, read: state.ReadPiece) -> None:
        state.load_checkpoint_state(self, read)

    def scalar_state(self) -> dict:
        return state.scalar_state(self)

    def parameter_shards(self) -> list[tuple]:
        """ZeRO-3: (param, view of my shard of it, (lo, hi) in the flattened parameter)."""
        return state.parameter_shards(self)

    def load_scalar_state(self, scalars: dict) -> None:
        state.load_scalar_state(self, scalars)

    def full_parameters(self, writeback: bool = False) -> contextlib.AbstractContextManager:
        """Context: every parameter materialised inside (ZeRO-3); re-sharded on exit."""
        return state.full_parameters(self, writeback)
