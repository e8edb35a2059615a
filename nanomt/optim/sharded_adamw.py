"""The sharded optimizer: AdamW on this rank's shard of every bucket, with fp32 master weights.

ZeRO (Rajbhandari et al. 2019, section 5 and figure 1) removes the redundancy of plain data
parallelism. With Psi parameters, N_d ranks and mixed-precision Adam (2 bytes param + 2 grad +
K = 12 optimizer state), the model-state bytes per rank are

    stage 0  (2 + 2 + K) Psi            all-reduce the gradients, every rank updates everything
    stage 1  (2 + 2) Psi + K Psi / N_d  each rank updates only its shard, then all-gathers params
    stage 2  2 Psi + (2 + K) Psi / N_d  gradients reduce-scattered: keep only my shard's
    stage 3  (2 + 2 + K) Psi / N_d      parameters sharded too, gathered per layer when used

Where parameters and gradients live, and how gradients are reduced, is the gradient buffer's
business (nanomt.parallel.data_parallel.GradientBuffer); this object holds only the optimizer
state of its shard (K Psi / N_d: the fp32 master weights, unless the run is fp32 and the
parameters are their own masters, and Adam's two moments) and, each step,

    finalize_grads   (the trainer's phase) gradients complete and summed
    clip_grads()     fp16: divide by the loss scale; the global gradient norm, counting every
                     parameter once over tp x pp x dp, and the inf/nan verdict, on the device
                     (nanomt.optim.grad_norm); fp16: the next step's loss scale, on the device,
                     from the verdict (nanomt.optim.loss_scaler); clip by the norm
    step(verdict)    torch.optim.AdamW on per-parameter views of the fp32 shard
                     (nanomt.optim.adamw), unless the verdict (read on the host, the same on
                     every rank) says inf/nan: then no rank updates and Adam's t does not
                     advance; the buffer writes the new shard into the model and all-gathers it
                     (ZeRO-1/2). step() without a verdict runs finalize_grads and clip_grads
                     and reads the verdict itself (torch.optim's one-call step).

Checkpoint protocol (layout-independent, per parameter; nanomt.checkpoint speaks it):
    checkpoint_state() -> [(param, state_name, fp32 view, (lo, hi))]: the pieces of
        "exp_avg", "exp_avg_sq" (and "master" under bf16/fp16) in my shard, [lo, hi) a range of
        the flattened (tp-local) parameter; load_checkpoint_state(read) reads them back.
    scalar_state() / load_scalar_state(): {"step", "loss_scaler"}.
    parameter_shards(), full_parameters(writeback=...): ZeRO-3's weights as shards / gathered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from nanomt.optim.adamw import build_adamw
from nanomt.optim.grad_norm import clip_, read_norm, squares_and_verdict
from nanomt.optim.loss_scaler import DynamicLossScaler
from nanomt.parallel.data_parallel import GradientBuffer, finalize_grads
from nanomt.parallel.data_parallel.buckets import Bucket, storage_bytes

# read(param, state_name, (lo, hi)) -> the checkpoint's values of that piece
ReadPiece = Callable[[nn.Parameter, str, tuple[int, int]], torch.Tensor]
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class StepResult:
    grad_norm: float   # global norm of the (unscaled) gradient before clipping
    skipped: bool      # True when an inf/nan gradient made every rank skip the update
    loss_scale: float | torch.Tensor  # the scale of this step's backward (1.0 unless fp16;
    #                                    fp16: S on the device, read by whoever needs it)


@dataclass
class ShardState:
    """AdamW's state for one bucket's shard (all fp32, shard_numel elements): flat, so that
    memory and checkpoints see one tensor per bucket; torch.optim.AdamW sees per-parameter
    views of it (`ShardedAdamW.views`)."""

    master: torch.Tensor       # the parameters' own shard in fp32 runs, else a copy
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


class ShardedAdamW:
    """AdamW over the shards a GradientBuffer hands out (module docstring)."""

    def __init__(self, buffer: GradientBuffer, *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, grad_clip: float,
                 master_params: dict[int, torch.Tensor] | None = None,
                 loss_scaler: DynamicLossScaler | None = None):
        self.buffer, self.grid, self.stage = buffer, buffer.grid, buffer.stage
        self.grad_clip = grad_clip
        # The step's device: every scalar of the step (norm totals, loss scale) is made here,
        # even on a rank whose shards hold only padding (NCCL reduces device tensors only).
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
        self._loss_scale: float | torch.Tensor = 1.0  # of the backward being clipped

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
        """torch's per-parameter state, set before its first step so that the moments are
        views of the flat shards, and its step count is Adam's t (`steps_taken`). The count
        lives where torch keeps it: on the device for the fused kernel, else on the host."""
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
        """Unscale (fp16), take the global norm and the inf/nan verdict, update the loss scale
        from it (fp16, on the device), and clip by the norm; call after finalize_grads. Reads
        nothing: returns the totals [||g||^2 before clipping, inf/nan carrier] on the device
        (grad_norm.read_norm reads them). The clipped fp32 gradients become the `.grad` of the
        views torch's AdamW updates."""
        buffer = self.buffer
        buffer.release_prefetched()  # no ZeRO-3 gather may read a shard while it is updated
        buffer.wait_for_params()  # nor a ZeRO-1/2 gather left in flight by the last step
        # Gradients complete, nothing freed yet: the step's peak of model-state memory.
        self.memory_after_backward = {**self.memory(),
                                      "grads_peak_in_backward": buffer.peak_grad_bytes}
        scaler = self.loss_scaler
        grads = [g.float() for g in buffer.local_grad_shards()]  # a copy only if not fp32
        if scaler is not None:  # fp16: divide by S, on the device
            torch._foreach_mul_(grads, scaler.unscale_factor())
        pieces = [(s.param, grads[i][s.shard_lo: s.shard_hi]) for i, s, _ in self.views]
        # At ZeRO-0 every dp replica holds the same gradients: dp rank 0 counts them.
        totals = squares_and_verdict(pieces, self.device, self.grid, buffer.dp_group,
                                     count_squares=self.stage > 0 or buffer.dp_rank == 0)
        self._loss_scale = scaler.scale if scaler is not None else 1.0
        if scaler is not None:  # the next step's S, from the verdict, without reading it
            scaler.update(~torch.isfinite(totals).all())
        clip_(grads, totals, self.grad_clip)
        for (_, _, view), (_, grad) in zip(self.views, pieces):
            view.grad = grad
        return totals

    @torch.no_grad()
    def step(self, grad_norm: float | None = None, overflow: bool | None = None
             ) -> StepResult:
        """AdamW on my shards with the clipped gradients, then publish the updated parameters;
        on inf/nan (`overflow`, read on the host: the same verdict on every rank) nothing is
        updated. Without them: finalize_grads, clip_grads and their one read happen here."""
        if overflow is None:
            finalize_grads(self.buffer)  # a no-op when the caller has run it
            grad_norm, overflow, _ = read_norm(self.clip_grads())
        if not overflow:
            self.steps_taken += 1
            self.adamw.step()
            self.buffer.publish_params([shard.master for shard in self.shards])
        for _, _, view in self.views:
            view.grad = None  # the gradients are the buffer's again
        return StepResult(grad_norm, overflow, self._loss_scale)

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds now: the buffer's parameters and gradients, and my state."""
        state = 0
        for b, shard in zip(self.buffer.buckets, self.shards):
            state += storage_bytes(shard.exp_avg) + storage_bytes(shard.exp_avg_sq)
            own = self.buffer.own_param_shard(b)
            if shard.master.untyped_storage().data_ptr() != own.untyped_storage().data_ptr():
                state += storage_bytes(shard.master)
        return {**self.buffer.memory(), "optimizer_state": state}

    # ---- what callers read ---------------------------------------------------------------------
    @property
    def loss_scale(self) -> float | torch.Tensor:
        """S for the schedule: backward starts from S * loss / m. 1.0 unless fp16; fp16: S on
        the device, in fp32 (the loss's dtype), so that the schedule reads nothing."""
        return self.loss_scaler.scale.float() if self.loss_scaler is not None else 1.0

    @property
    def param_groups(self) -> list[dict]:
        """torch's two groups (decay, no decay): the trainer sets "lr" in each every step."""
        return self.adamw.param_groups

    @property
    def buckets(self) -> list[Bucket]:
        return self.buffer.buckets

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return self.buffer.named_parameters()

    # ---- checkpoints -------------------------------------------------------------------------
    def state_names(self) -> tuple[str, ...]:
        separate_master = any(b.dtype != torch.float32 for b in self.buffer.buckets)
        return MOMENTS + (("master",) if separate_master else ())

    def checkpoint_state(self) -> list[tuple]:
        pieces = []
        for b, shard in zip(self.buffer.buckets, self.shards):
            for s in b.segments:
                for name in self.state_names():
                    tensor = getattr(shard, name)[s.shard_lo: s.shard_hi].detach()  # a view
                    pieces.append((s.param, name, tensor, (s.param_lo, s.param_hi)))
        return pieces

    @torch.no_grad()
    def load_checkpoint_state(self, read: ReadPiece) -> None:
        """Masters start from the (already loaded) parameters; then every piece of my shard is
        read (a "master" missing from the checkpoint keeps the parameters' values), and the
        parameters are published again."""
        for b, shard in zip(self.buffer.buckets, self.shards):
            own = self.buffer.own_param_shard(b)
            if own.data_ptr() != shard.master.data_ptr():
                shard.master.copy_(own)
            for s in b.segments:
                for name in self.state_names():
                    try:
                        value = read(s.param, name, (s.param_lo, s.param_hi))
                    except KeyError:
                        if name == "master":
                            continue  # e.g. a checkpoint of an fp32 run: the weights are it
                        raise
                    getattr(shard, name)[s.shard_lo: s.shard_hi].copy_(value.reshape(-1))
        self.buffer.publish_params([shard.master for shard in self.shards])

    @property
    def step_count(self) -> int:
        """Adam's step t: the updates applied so far."""
        return self.steps_taken

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.steps_taken = int(value)
        for state in self.adamw.state.values():
            state["step"].fill_(self.steps_taken)

    def scalar_state(self) -> dict:
        scaler = self.loss_scaler
        return {"step": self.step_count,
                "loss_scaler": scaler.state_dict() if scaler is not None else None}

    def load_scalar_state(self, scalars: dict) -> None:
        self.step_count = int(scalars["step"])
        if self.loss_scaler is not None and scalars.get("loss_scaler"):
            self.loss_scaler.load_state_dict(scalars["loss_scaler"])

    def parameter_shards(self) -> list[tuple]:
        """ZeRO-3: (param, view of my shard of it, (lo, hi) in the flattened parameter)."""
        return [(s.param, b.param_shard[s.shard_lo: s.shard_hi], (s.param_lo, s.param_hi))
                for b in self.buffer.buckets for s in b.segments]

    @contextlib.contextmanager
    def full_parameters(self, writeback: bool = False) -> Iterator[None]:
        """Every parameter materialised inside the block (ZeRO-3); writeback=True re-shards
        the values found there on exit."""
        gatherer = self.buffer.gatherer
        if gatherer is None:
            yield
            return
        gatherer.gather_all()
        try:
            yield
            if writeback:
                with torch.no_grad():
                    for b in self.buffer.buckets:
                        b.param_shard.copy_(b.shard_of(b.param_buffer))
        finally:
            gatherer.free_all()
