"""What checkpoints and memory reports read from the sharded optimizer.

What it buys: checkpoints independent of the layout. Every piece of state is named by its
parameter and a range of that parameter's flattened (tp-local) tensor, never by bucket or
shard, so a checkpoint saved at one (dp, ZeRO stage) loads into another (nanomt.checkpoint
speaks this protocol):

    checkpoint_state() -> [(param, state_name, fp32 view, (lo, hi))]: "exp_avg", "exp_avg_sq"
        (and "master" under bf16/fp16) of my shard; load_checkpoint_state(read) reads them back
    scalar_state() / load_scalar_state(): {"step", "loss_scaler"}
    parameter_shards(), full_parameters(writeback=...): ZeRO-3's weights as shards / gathered
    memory(), memory_after_backward: the bytes this rank holds for model states (nanomt.memory)
    buckets, named_parameters(): the buffer's layout and its parameters' keys
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from nanomt.optim.adamw import MOMENTS
from nanomt.parallel.data_parallel.memory_accounting import storage_bytes

# read(param, state_name, (lo, hi)) -> the checkpoint's values of that piece
ReadPiece = Callable[[nn.Parameter, str, tuple[int, int]], torch.Tensor]


class ShardStateProtocol:
    """Mixed into ShardedAdamW: reads `self.buffer`, `self.shards`, `self.adamw`,
    `self.loss_scaler` and `self.steps_taken`."""

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

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds now: the buffer's parameters and gradients, and my state."""
        state = 0
        for b, shard in zip(self.buffer.buckets, self.shards):
            state += storage_bytes(shard.exp_avg) + storage_bytes(shard.exp_avg_sq)
            own = self.buffer.own_param_shard(b)
            if shard.master.untyped_storage().data_ptr() != own.untyped_storage().data_ptr():
                state += storage_bytes(shard.master)
        return {**self.buffer.memory(), "optimizer_state": state}

    def note_memory_after_backward(self) -> None:
        """`memory_after_backward`: model-state bytes with the gradients complete."""
        self.memory_after_backward = {**self.memory(),
                                      "grads_peak_in_backward": self.buffer.peak_grad_bytes}

    @property
    def buckets(self) -> list:
        return self.buffer.buckets

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(key, parameter) for every parameter, key = "<chunk index>.<name in the chunk>"."""
        return [(name, p) for b in self.buffer.buckets for name, p in zip(b.names, b.params)]
