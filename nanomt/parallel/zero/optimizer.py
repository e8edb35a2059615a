"""ZeroOptimizer: data parallelism with ZeRO-sharded optimizer state, gradients and parameters.

ZeRO (Rajbhandari et al. 2019) removes the redundancy of plain data parallelism: with Psi
parameters, N_d ranks and mixed-precision Adam (2 bytes param + 2 grad + K = 12 optimizer), the
bytes per rank are

    stage 0  (2 + 2 + K) Psi            all-reduce the gradients, every rank updates everything
    stage 1  (2 + 2) Psi + K Psi / N_d  each rank updates only its shard, then all-gathers params
    stage 2  2 Psi + (2 + K) Psi / N_d  gradients reduce-scattered: keep only my shard's
    stage 3  (2 + 2 + K) Psi / N_d      parameters sharded too, gathered per layer when used

One step, seen from a rank:
  backward    each parameter's gradient is added into its bucket's flat grad buffer by a
              post-accumulate-grad hook; when the last micro-batch's gradient of every parameter
              of a bucket has arrived, the bucket's all-reduce (0, 1) or reduce-scatter (2, 3) is
              launched asynchronously, overlapping the rest of backward. Micro-batches are
              counted per parameter, so any schedule (accumulation, 1F1B, interleaved) reduces
              exactly once per step without telling the optimizer which micro-batch is last.
  step()      wait for the reductions; finish the sums other groups owe (sequence-parallel
              gradients over tp, the tied embedding over the embedding group); unscale (fp16);
              global grad norm and overflow flag, agreed over the world; clip; AdamW on my fp32
              shard; publish the new weights (all-gather for 1-2; ZeRO-3 gathers at use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanomt.optim.adamw import adamw_update_, decays
from nanomt.optim.grad_norm import counted_once
from nanomt.optim.loss_scaler import DynamicLossScaler
from nanomt.parallel import comm
from nanomt.parallel.zero.buckets import Bucket, make_bucket, plan_by_layer, plan_by_size
from nanomt.parallel.zero.stage3 import ParameterGatherer
from nanomt.parallel.zero import state


# torch 2.13 renamed the single-tensor collectives (the old names warn); accept either.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class StepResult:
    grad_norm: float   # global norm of the (unscaled) gradient before clipping
    skipped: bool      # True when an inf/nan gradient made every rank skip the update
    loss_scale: float  # the scale that was used for this step's backward (1.0 unless fp16)


def free_storage(tensor: torch.Tensor) -> None:
    tensor.untyped_storage().resize_(0)


def alloc_storage(tensor: torch.Tensor, numel: int) -> None:
    if tensor.untyped_storage().size() == 0:
        tensor.untyped_storage().resize_(numel * tensor.element_size())


class ZeroOptimizer:
    """AdamW over flat shards for the parameters of `chunks` (one or more model chunks)."""

    def __init__(self, chunks: list[nn.Module], grid, *, zero_stage: int, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, grad_clip: float,
                 num_microbatches: int, bucket_size_mb: float = 25.0,
                 master_params: dict[int, torch.Tensor] | None = None,
                 loss_scaler: DynamicLossScaler | None = None):
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
        self.chunks, self.grid, self.stage = list(chunks), grid, zero_stage
        self.betas, self.eps, self.weight_decay, self.grad_clip = betas, eps, weight_decay, grad_clip
        self.num_microbatches = num_microbatches
        self.loss_scaler = loss_scaler
        self.dp_group = grid.dp_group if grid is not None else None
        self.dp = comm.group_size(self.dp_group)
        self.dp_rank = dist.get_rank(self.dp_group) if self.dp > 1 else 0
        # The same two groups as torch.optim.AdamW built by nanomt.optim.adamw.parameter_groups;
        # the train loop sets "lr" here every step.
        self.param_groups = [{"lr": lr, "weight_decay": weight_decay},
                             {"lr": lr, "weight_decay": 0.0}]
        self.step_count = 0
        self.reductions_launched = 0  # collectives launched for gradients (tests count them)

        self.names: dict[int, str] = {}
        named: list[tuple[str, nn.Parameter]] = []
        for i, chunk in enumerate(self.chunks):
            for name, param in chunk.named_parameters():
                if param.requires_grad:
                    self.names[id(param)] = f"{i}.{name}"
                    named.append((f"{i}.{name}", param))
        self.buckets = self._build_buckets(named, bucket_size_mb)
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._allocate(master_params or {})
        self.gatherer = ParameterGatherer(self) if zero_stage == 3 else None
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                       for b in self.buckets for p in b.params]
        self.zero_grad()

    # ---- layout ------------------------------------------------------------------------------
    def _shared_embedding_params(self) -> list[nn.Parameter]:
        """The tied embedding gets its own bucket when a second copy lives on another stage."""
        if self.grid is None or comm.group_size(self.grid.embedding_group) == 1:
            return []
        return [p for c in self.chunks for p in c.parameters()
                if getattr(p, "shared_embedding", False)]

    def _build_buckets(self, named, bucket_size_mb: float) -> list[Bucket]:
        separate = self._shared_embedding_params()
        if self.stage == 3:
            plans = plan_by_layer(self.chunks, self.names, separate)
        else:
            plans = plan_by_size(named, bucket_size_mb, separate)
        shard_world, shard_rank = (1, 0) if self.stage == 0 else (self.dp, self.dp_rank)
        return [make_bucket(i, params, shard_world, shard_rank, owner)
                for i, (params, owner) in enumerate(plans)]

    @torch.no_grad()
    def _allocate(self, master_params: dict[int, torch.Tensor]) -> None:
        """Move parameters into flat buffers; create grad buffers, fp32 masters and moments."""
        for b in self.buckets:
            device = b.params[0].device
            b.param_buffer = torch.zeros(b.padded_numel, dtype=b.dtype, device=device)
            b.grad_buffer = torch.zeros(b.padded_numel, dtype=b.dtype, device=device)
            master_full = torch.zeros(b.padded_numel, dtype=torch.float32, device=device)
            for param, offset in zip(b.params, b.offsets):
                view = b.param_buffer[offset: offset + param.numel()]
                view.copy_(param.reshape(-1))
                fp32 = master_params.get(id(param), param)  # the fp32 init, before any cast
                master_full[offset: offset + param.numel()].copy_(fp32.reshape(-1))
                param.data = view.view_as(param)
                param.main_grad = b.grad_buffer[offset: offset + param.numel()].view_as(param)
            sharded_grads = self.stage >= 2
            b.grad_shard = (torch.zeros(b.shard_numel, dtype=b.dtype, device=device)
                            if sharded_grads else b.shard_of(b.grad_buffer))
            if self.stage == 3:
                b.param_shard = b.shard_of(b.param_buffer).clone()
                free_storage(b.param_buffer)
                b.gathered = False
            own_params = b.param_shard if self.stage == 3 else b.shard_of(b.param_buffer)
            # fp32 training: the parameters themselves are the master weights.
            b.master = own_params if b.dtype == torch.float32 else b.shard_of(master_full).clone()
            b.exp_avg = torch.zeros(b.shard_numel, dtype=torch.float32, device=device)
            b.exp_avg_sq = torch.zeros(b.shard_numel, dtype=torch.float32, device=device)
            b.handle = None
            if sharded_grads:
                free_storage(b.grad_buffer)

    # ---- backward: accumulate, and reduce each bucket once its gradients are complete ------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start a new step: empty the gradient buffers and the per-parameter counters."""
        for b in self.buckets:
            if self.stage <= 1:
                b.grad_buffer.zero_()
            b.pending = len(b.params)
            b.launched = False
            for param in b.params:
                param.grad = None
        self.arrivals = {id(p): 0 for b in self.buckets for p in b.params}

    @torch.no_grad()
    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket = self.bucket_of[id(param)]
        if bucket.grad_buffer.untyped_storage().size() == 0:  # ZeRO-2/3: first use this step
            alloc_storage(bucket.grad_buffer, bucket.padded_numel)
            bucket.grad_buffer.zero_()
        param.main_grad.add_(param.grad)
        param.grad = None
        self.arrivals[id(param)] += 1
        if self.arrivals[id(param)] == self.num_microbatches:
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch_reduction(bucket)
        if self.gatherer is not None:
            self.gatherer.on_grad_ready(param)

    def _launch_reduction(self, b: Bucket) -> None:
        """Average the bucket over dp: all-reduce (0, 1) or reduce-scatter into my shard (2, 3)."""
        b.launched = True
        if self.dp == 1:
            if self.stage >= 2:
                b.grad_shard.copy_(b.grad_buffer)
            return
        b.grad_buffer.div_(self.dp)
        self.reductions_launched += 1
        if self.stage <= 1:
            b.handle = dist.all_reduce(b.grad_buffer, group=self.dp_group, async_op=True)
        else:
            b.handle = reduce_scatter_single(b.grad_shard, b.grad_buffer,
                                                  group=self.dp_group, async_op=True)

    @torch.no_grad()
    def finish_grad_sync(self) -> None:
        """Wait for every bucket's reduction (launching any a parameter without gradient held
        back), then add the sums owed over tp (sequence parallel) and the embedding group."""
        for b in self.buckets:
            if not b.launched:
                if b.grad_buffer.untyped_storage().size() == 0:
                    alloc_storage(b.grad_buffer, b.padded_numel)
                    b.grad_buffer.zero_()
                self._launch_reduction(b)
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
                b.handle = None
            if self.stage >= 2:
                free_storage(b.grad_buffer)
        self._sum_over_other_groups()

    def _sum_over_other_groups(self) -> None:
        """Sums are linear, so they commute with the dp reduction: do them on my shard.

        Buckets have the same layout on every tp rank of a stage (equal shard shapes), and the
        tied embedding's bucket the same on the first and last stage, so shards line up."""
        if self.grid is None:
            return
        tp_group, emb_group = self.grid.tp_group, self.grid.embedding_group
        sp_pieces = [b.grad_shard[s.shard_lo: s.shard_hi] for b in self.buckets
                     for s in b.segments if getattr(s.param, "sequence_parallel", False)]
        if sp_pieces and comm.group_size(tp_group) > 1:
            flat = torch.cat(sp_pieces)
            comm.all_reduce(flat, tp_group)
            for piece, summed in zip(sp_pieces, flat.split([p.numel() for p in sp_pieces])):
                piece.copy_(summed)
        if comm.group_size(emb_group) > 1:
            for param in self._shared_embedding_params():
                comm.all_reduce(self.bucket_of[id(param)].grad_shard, emb_group)

    # ---- the update ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepResult:
        """Reduce, unscale, clip by the global norm and update. Returns norm and skip flag."""
        self.finish_grad_sync()
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        grads = [b.grad_shard.float() for b in self.buckets]  # a copy unless already fp32
        if scale != 1.0:
            for g in grads:
                g.mul_(1.0 / scale)
        norm, overflow = self._global_norm_and_overflow(grads)
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow)
        if overflow:
            self.zero_grad()
            return StepResult(float(norm), True, scale)
        if self.grad_clip > 0:
            coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef)
        self.step_count += 1
        for b, g in zip(self.buckets, grads):
            self._update_bucket(b, g)
        self._publish_params()
        self.zero_grad()
        return StepResult(float(norm), False, scale)

    def _global_norm_and_overflow(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """||g|| over the whole model, each parameter counted once (see nanomt.optim.grad_norm),
        and whether any rank anywhere holds inf/nan: one all-reduce over dp, one over tp x pp."""
        tp_rank = self.grid.tp_rank if self.grid is not None else 0
        first = self.grid.is_first_stage if self.grid is not None else True
        # [sum of squares, overflow count]; at ZeRO-0 dp replicas hold the same grads: count
        # them on dp rank 0 only, so that the sum over dp below is exact.
        totals = torch.zeros(2, dtype=torch.float32, device=grads[0].device)
        counts_norm = self.stage > 0 or self.dp_rank == 0
        for b, g in zip(self.buckets, grads):
            totals[1] += (~torch.isfinite(g)).sum()
            if not counts_norm:
                continue
            for s in b.segments:
                if counted_once(s.param, tp_rank, first):
                    totals[0] += g[s.shard_lo: s.shard_hi].pow(2).sum()
        comm.all_reduce(totals, self.dp_group)
        if self.grid is not None:
            comm.all_reduce(totals, self.grid.model_parallel_group)
        overflow = bool(totals[1] > 0) or not bool(torch.isfinite(totals[0]))
        return totals[0].sqrt(), overflow

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
                handles.append(all_gather_single(
                    b.param_buffer, own.clone(), group=self.dp_group, async_op=True))
        for handle in handles:
            handle.wait()

    # ---- fp16 ------------------------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss whose backward yields gradients times the loss scale (identity unless fp16)."""
        if self.loss_scaler is None:
            return loss
        from nanomt.optim.loss_scaler import ScaleGradient

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

    def load_checkpoint_state(self, read) -> None:
        state.load_checkpoint_state(self, read)

    def scalar_state(self) -> dict:
        return state.scalar_state(self)

    def load_scalar_state(self, scalars: dict) -> None:
        state.load_scalar_state(self, scalars)

    def full_parameters(self, writeback: bool = False):
        """Context: every parameter materialised inside (ZeRO-3); re-sharded on exit."""
        return state.full_parameters(self, writeback)
