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

    finalize_grads   (the caller's phase; done here if it was not) gradients complete and summed
    clip_grads()     fp16: divide by the loss scale; the global gradient norm, counting every
                     parameter once over tp x pp x dp, and the inf/nan verdict, on the device
                     (nanomt.optim.grad_norm), read in the step's one host sync unless
                     read=False; fp16: the next step's loss scale, on the device, from the
                     verdict (nanomt.optim.loss_scaler); clip by the norm
    step()           AdamW on the fp32 shard (nanomt.optim.adamw), or on inf/nan skip it on
                     every rank (Adam's step count does not advance); the buffer writes the new
                     shard into the model and all-gathers it (ZeRO-1/2). step() alone runs
                     clip_grads() first.

A step that reads nothing (clip_grads(read=False): the trainer's steps that log nothing,
logging.metrics_interval > 1) leaves no host sync behind: the skip is decided on the device (a
gated update, two passes more, the same numbers bit for bit), and from then on Adam's t lives
on the device only. fp16's loss scale is decided on the device too.

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
from dataclasses import dataclass, field

import torch
from torch import nn

from nanomt.optim.adamw import adamw_update_foreach_, adamw_update_foreach_gated_, decays
from nanomt.optim.grad_norm import read_verdict, squares_and_verdict
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
class ClippedGrads:
    """What clip_grads leaves for step: my shards' clipped fp32 gradients and the verdict, on
    the device, and on the host when clip_grads read them (else None)."""

    grads: list[torch.Tensor]
    totals: torch.Tensor  # [||g||^2 before clipping, inf/nan carrier]: grad_norm.py, fp32
    loss_scale: float | torch.Tensor  # of this step's backward (fp16: S, on the device)
    grad_norm: float | None = None
    overflow: bool | None = None
    read_along: list[float] | None = None  # read(along=...), in the same sync
    skipped: torch.Tensor = field(init=False)  # the verdict on the device: some rank's
    #                                            gradient holds an inf/nan (bool scalar)

    def __post_init__(self) -> None:
        self.skipped = ~torch.isfinite(self.totals).all()

    @property
    def sum_of_squares(self) -> torch.Tensor:
        return self.totals[0]

    def read(self, along: torch.Tensor | None = None) -> list[float]:
        """The host's copy of the norm and the verdict (a host sync), and of `along` (the
        step's loss, say) in the same copy; returns along's values."""
        self.grad_norm, self.overflow, self.read_along = read_verdict(self.totals, along)
        return self.read_along


@dataclass
class ShardState:
    """AdamW's state for one bucket's shard (all fp32, shard_numel elements)."""

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
        self.betas, self.eps = betas, eps
        self.weight_decay, self.grad_clip = weight_decay, grad_clip
        self.loss_scaler = loss_scaler  # fp16; its state lives on the optimizer's device
        # The same two groups as torch.optim.AdamW built by nanomt.optim.adamw.parameter_groups;
        # the train loop sets "lr" here every step.
        self.param_groups = [{"lr": lr, "weight_decay": weight_decay},
                             {"lr": lr, "weight_decay": 0.0}]
        self.device = self.buffer.own_param_shard(buffer.buckets[0]).device \
            if buffer.buckets else torch.device("cpu")
        self.step_tensor = torch.zeros((), dtype=torch.int64, device=self.device)  # Adam's t
        if loss_scaler is not None:
            loss_scaler.to(self.device)
        self.host_steps: int | None = 0  # t on the host, while every verdict has been read
        self.memory_after_backward: dict[str, int] = {}  # model-state bytes at the step's peak
        self.clipped: ClippedGrads | None = None  # between clip_grads and step
        self.shards = [self._shard_state(b, master_params or {}) for b in buffer.buckets]
        # views of the masters that weight decay shrinks (matrices; nanomt.optim.adamw.decays)
        self.decaying_pieces = [shard.master[s.shard_lo: s.shard_hi]
                                for b, shard in zip(buffer.buckets, self.shards)
                                for s in b.segments if decays(s.param)]

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

    # ---- the step ----------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True, num_microbatches: int | None = None) -> None:
        """Start a new step (the buffer's zero_grad; torch.optim's signature)."""
        self.buffer.zero_grad(set_to_none, num_microbatches)

    @torch.no_grad()
    def clip_grads(self, read_along: torch.Tensor | None = None, read: bool = True
                   ) -> ClippedGrads:
        """Unscale (fp16), take the global norm and the inf/nan verdict, update the loss scale
        from it (fp16, on the device), and clip by the norm.

        read=True: the one host read of a step happens here, the norm and the verdict, with
        `read_along` (the step's loss, say) in the same copy. read=False: nothing is read; the
        verdict stays on the device, where step() is gated by it. The clipped fp32 gradients
        wait for `step`."""
        buffer = self.buffer
        buffer.release_prefetched()  # no ZeRO-3 gather may read a shard while it is updated
        buffer.wait_for_params()  # nor a ZeRO-1/2 gather left in flight by the last step
        # Gradients complete, nothing freed yet: the step's peak of model-state memory.
        self.memory_after_backward = {**self.memory(),
                                      "grads_peak_in_backward": buffer.peak_grad_bytes}
        finalize_grads(buffer)  # a no-op when the trainer has called it
        scaler = self.loss_scaler
        grads = [g.float() for g in buffer.local_grad_shards()]  # a copy only if not fp32
        if scaler is not None:  # fp16: divide by S, on the device
            torch._foreach_mul_(grads, scaler.unscale_factor())
        pieces = [(s.param, grad[s.shard_lo: s.shard_hi])
                  for b, grad in zip(buffer.buckets, grads) for s in b.segments]
        # At ZeRO-0 every dp replica holds the same gradients: dp rank 0 counts them.
        totals = squares_and_verdict(pieces, self.grid, buffer.dp_group,
                                     count_squares=self.stage > 0 or buffer.dp_rank == 0)
        clipped = ClippedGrads(grads, totals, scaler.scale if scaler is not None else 1.0)
        if scaler is not None:  # the next step's S, from the verdict, without reading it
            scaler.update(clipped.skipped)
        if read:
            clipped.read(read_along)
        if self.grad_clip > 0:  # inf/nan makes the gradients nan: step() then skips them
            torch._foreach_mul_(grads, torch.clamp(self.grad_clip / (totals[0].sqrt() + 1e-6),
                                                   max=1.0))
        self.clipped = clipped
        return clipped

    @torch.no_grad()
    def step(self) -> StepResult | None:
        """AdamW on my shards with the clipped gradients (clip_grads first, if the caller has
        not), then publish the updated parameters; an inf/nan gradient skips the update on
        every rank (fp16: clip_grads has halved the loss scale). Returns the norm and the skip
        flag, or None when clip_grads(read=False) left them on the device."""
        clipped = self.clipped if self.clipped is not None else self.clip_grads()
        self.clipped = None
        if clipped.overflow is not None and self.host_steps is not None:
            if not clipped.overflow:  # the verdict is on the host: skip, or the plain update
                self.host_steps += 1
                self.step_tensor += 1
                self._update(clipped.grads, self.host_steps)
                self.buffer.publish_params([shard.master for shard in self.shards])
        else:  # decided on the device; t is known there only from now on
            self.host_steps = None
            self._update_gated(clipped.grads, ~clipped.skipped)
            self.buffer.publish_params([shard.master for shard in self.shards])
        self.buffer.zero_grad()
        if clipped.overflow is None:
            return None
        return StepResult(clipped.grad_norm, clipped.overflow, clipped.loss_scale)

    def _learning_rate(self) -> tuple[float, float]:
        """(lr, weight decay of the matrices): one lr for the flat shards."""
        lr_decay, lr_flat = self.param_groups[0]["lr"], self.param_groups[1]["lr"]
        if lr_decay != lr_flat:
            raise ValueError("ShardedAdamW updates a flat shard with one learning rate; "
                             "set the same lr in every param group")
        return lr_decay, self.param_groups[0]["weight_decay"]

    def _update(self, grads: list[torch.Tensor], step: int) -> None:
        """Decoupled weight decay on the matrices' pieces, then AdamW on every shard at once."""
        lr, wd = self._learning_rate()
        if wd != 0 and self.decaying_pieces:
            torch._foreach_mul_(self.decaying_pieces, 1 - lr * wd)
        adamw_update_foreach_([s.master for s in self.shards], grads,
                              [s.exp_avg for s in self.shards],
                              [s.exp_avg_sq for s in self.shards], step, lr, self.betas,
                              self.eps)

    def _update_gated(self, grads: list[torch.Tensor], update: torch.Tensor) -> None:
        """`_update` gated by `update` (a device bool: False leaves everything as it was); the
        same numbers, bit for bit, without a host read (logging.metrics_interval > 1)."""
        lr, wd = self._learning_rate()
        if wd != 0 and self.decaying_pieces:
            torch._foreach_mul_(self.decaying_pieces, torch.where(update, 1 - lr * wd, 1.0))
        self.step_tensor += update  # Adam's t counts the updates taken
        adamw_update_foreach_gated_([s.master for s in self.shards], grads,
                                    [s.exp_avg for s in self.shards],
                                    [s.exp_avg_sq for s in self.shards],
                                    self.step_tensor + ~update, lr, self.betas, self.eps,
                                    update)

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
        """Adam's step t: the updates taken so far (a host read of the device count once a step
        was decided on the device)."""
        return self.host_steps if self.host_steps is not None else int(self.step_tensor)

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.step_tensor.fill_(int(value))
        self.host_steps = int(value)

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
