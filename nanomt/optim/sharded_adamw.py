"""The sharded optimizer: AdamW on this rank's shard of every bucket, with fp32 master weights.

ZeRO's optimizer state, K Psi / N_d (zero_stages.py): the fp32 masters (unless the parameters
are fp32 and their own) and Adam's two moments of my shard. After finalize_grads, each step

    clip_grads()   fp16: unscale (loss_scaler.py); the global norm and the inf/nan verdict on
                   the device (grad_norm.py); clip
    step(verdict)  unless inf/nan (read on the host, the same on every rank): torch's AdamW on
                   per-parameter views of the fp32 shard (adamw.py); publish it to the model
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanomt.optim.adamw import MOMENTS, build_adamw
from nanomt.optim.grad_norm import clip_, read_norm, squares_and_verdict
from nanomt.optim.loss_scaler import DynamicLossScaler
from nanomt.optim.state_protocol import ShardStateProtocol
from nanomt.parallel.data_parallel import GradientBuffer, finalize_grads
from nanomt.parallel.data_parallel.buckets import Bucket


@dataclass
class StepResult:
    grad_norm: float   # global norm of the (unscaled) gradient before clipping
    skipped: bool      # True when an inf/nan gradient made every rank skip the update


@dataclass
class ShardState:
    """AdamW's state for one bucket's shard, flat fp32; torch sees per-parameter views."""

    master: torch.Tensor       # the parameters' own shard in fp32 runs, else a copy
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


class ShardedAdamW(ShardStateProtocol):
    """AdamW over the shards a GradientBuffer hands out; state_protocol.py: its state read."""

    def __init__(self, buffer: GradientBuffer, *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, grad_clip: float,
                 master_params: dict[int, torch.Tensor] | None = None,
                 loss_scaler: DynamicLossScaler | None = None):
        self.buffer, self.grid, self.stage = buffer, buffer.grid, buffer.stage
        self.grad_clip = grad_clip
        # The step's scalars live here, even on a rank holding only padding (NCCL: no CPU).
        self.device = buffer.buckets[0].param_buffer.device
        self.loss_scaler = loss_scaler.to(self.device) if loss_scaler is not None else None
        self.steps_taken = 0  # Adam's t: the updates applied so far (read from no device)
        self.memory_after_backward: dict[str, int] = {}  # model-state bytes at the step's peak
        self.shards = [self._shard_state(b, master_params or {}) for b in buffer.buckets]
        # (bucket index, segment, view of the master shard): what torch's AdamW updates
        self.views = [(i, s, shard.master[s.shard_lo: s.shard_hi])
                      for i, (b, shard) in enumerate(zip(buffer.buckets, self.shards))
                      for s in b.segments]
        self.adamw = build_adamw([(s.param, view) for _, s, view in self.views], lr=lr,
                                 betas=betas, eps=eps, weight_decay=weight_decay)
        self._set_torch_state()

    @torch.no_grad()
    def _shard_state(self, b: Bucket, master_params: dict[int, torch.Tensor]) -> ShardState:
        own = self.buffer.own_param_shard(b)
        moments = [torch.zeros(b.shard_numel, dtype=torch.float32, device=own.device)
                   for _ in MOMENTS]
        if b.dtype == torch.float32:  # fp32 training: the parameters are the master weights
            return ShardState(own, *moments)
        master = torch.zeros(b.shard_numel, dtype=torch.float32, device=own.device)
        for s in b.segments:  # the fp32 values from before the cast to bf16/fp16
            fp32 = master_params.get(id(s.param), s.param).reshape(-1)
            master[s.shard_lo: s.shard_hi].copy_(fp32[s.param_lo: s.param_hi])
        return ShardState(master, *moments)

    def _set_torch_state(self) -> None:
        """torch's state, set before its first step: the moments are views of the flat shards,
        the step count is Adam's t (on the device for the fused kernel, else on the host)."""
        fused = any(group["fused"] for group in self.adamw.param_groups)
        for i, s, view in self.views:
            shard = self.shards[i]
            self.adamw.state[view] = {
                "step": torch.tensor(float(self.steps_taken), dtype=torch.float32,
                                     device=view.device if fused else "cpu"),
                **{name: getattr(shard, name)[s.shard_lo: s.shard_hi] for name in MOMENTS}}

    # ---- the step ----------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True, num_microbatches: int | None = None) -> None:
        """Start a new step (the buffer's zero_grad; torch.optim's signature)."""
        self.buffer.zero_grad(set_to_none, num_microbatches)

    @torch.no_grad()
    def clip_grads(self) -> torch.Tensor:
        """Unscale, norm, verdict, the next loss scale, clip. Reads nothing: returns the totals
        [||g||^2 before clipping, inf/nan carrier] on the device (grad_norm.read_norm)."""
        buffer = self.buffer
        buffer.release_prefetched()  # no ZeRO-3 gather may read a shard while it is updated
        buffer.wait_for_params()  # nor a ZeRO-1/2 gather left in flight by the last step
        self.note_memory_after_backward()  # nothing freed yet: the step's peak
        scaler = self.loss_scaler
        grads = [g.float() for g in buffer.local_grad_shards()]  # a copy only if not fp32
        if scaler is not None:
            torch._foreach_mul_(grads, scaler.unscale_factor())
        pieces = [(s.param, grads[i][s.shard_lo: s.shard_hi]) for i, s, _ in self.views]
        # At ZeRO-0 a bucket's group holds the same gradients: its rank 0 counts them.
        counts = [self.stage > 0 or buffer.buckets[i].group_rank == 0 for i, _, _ in self.views]
        totals = squares_and_verdict(pieces, self.device, self.grid, buffer.dp_group, counts)
        if scaler is not None:  # the next step's S, from the verdict, without reading it
            scaler.update(~torch.isfinite(totals).all())
        clip_(grads, totals, self.grad_clip)
        for (_, _, view), (_, grad) in zip(self.views, pieces):
            view.grad = grad  # what torch's AdamW reads
        return totals

    @torch.no_grad()
    def step(self, grad_norm: float | None = None, overflow: bool | None = None
             ) -> StepResult:
        """AdamW on my shards, then publish them; nothing on `overflow`. Without a verdict,
        finalize_grads, clip_grads and their read run here (torch.optim's one-call step)."""
        if overflow is None:
            finalize_grads(self.buffer)  # a no-op when the caller has run it
            grad_norm, overflow, _ = read_norm(self.clip_grads())
        if not overflow:
            self.steps_taken += 1
            self.adamw.step()
            self.buffer.publish_params([shard.master for shard in self.shards])
        for _, _, view in self.views:
            view.grad = None  # the gradients are the buffer's again
        return StepResult(grad_norm, overflow)

    @property
    def loss_scale(self) -> float | torch.Tensor:
        """S: backward starts from S * loss / m. 1.0, or fp16's S on the device in fp32."""
        return self.loss_scaler.scale.float() if self.loss_scaler is not None else 1.0

    @property
    def param_groups(self) -> list[dict]:
        """torch's two groups (decay, no decay): the trainer sets "lr" in each every step."""
        return self.adamw.param_groups
