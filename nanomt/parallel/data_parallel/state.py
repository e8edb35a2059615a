"""Optimizer state for checkpoints, per parameter, independent of the dp size and the buckets.

The protocol nanomt.checkpoint speaks with flat-shard optimizers:

    optimizer.checkpoint_state() -> [(param, state_name, tensor, (lo, hi)), ...]
        for each piece of a parameter inside this rank's ZeRO shard: elements [lo, hi) of the
        flattened parameter (the rank's tensor-parallel shard of it) and its fp32 state there.
        state_name: "exp_avg", "exp_avg_sq", and "master" when the fp32 master weights are a
        copy (bf16/fp16); in fp32 the parameters are their own master.
    optimizer.load_checkpoint_state(read)   read(param, state_name, (lo, hi)) -> tensor
        refreshes the masters from the (already loaded) parameters, then reads every piece of
        my shard (a "master" missing from the checkpoint keeps the parameters' values), and
        republishes the parameters.
    optimizer.scalar_state() / load_scalar_state(state)
        {"step": Adam's step count, "loss_scaler": {"scale", "clean_steps"} or None}.
    optimizer.parameter_shards() -> [(param, shard view, (lo, hi)), ...]
        ZeRO-3 only: the weights as this dp rank holds them, elements [lo, hi) of each flattened
        (tp-local) parameter, as views into the rank's parameter shard (written in place on load).
    with optimizer.full_parameters(writeback=False): ...
        ZeRO-3 keeps parameters as shards; inside the block every parameter is materialised
        (to save or load weights); writeback=True re-shards the values found there on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from nanomt.parallel.zero.optimizer import ZeroOptimizer

# read(param, state_name, (lo, hi)) -> the checkpoint's values of that piece
ReadPiece = Callable[[nn.Parameter, str, tuple[int, int]], torch.Tensor]

MOMENTS = ("exp_avg", "exp_avg_sq")


def state_names(optimizer: ZeroOptimizer) -> tuple[str, ...]:
    separate_master = any(b.dtype != torch.float32 for b in optimizer.buckets)
    return MOMENTS + (("master",) if separate_master else ())


def checkpoint_state(optimizer: ZeroOptimizer) -> list[tuple]:
    pieces = []
    for b in optimizer.buckets:
        for s in b.segments:
            for name in state_names(optimizer):
                tensor = getattr(b, name)[s.shard_lo: s.shard_hi].detach().clone()
                pieces.append((s.param, name, tensor, (s.param_lo, s.param_hi)))
    return pieces


def parameter_shards(optimizer: ZeroOptimizer) -> list[tuple]:
    return [(s.param, b.param_shard[s.shard_lo: s.shard_hi], (s.param_lo, s.param_hi))
            for b in optimizer.buckets for s in b.segments]


@torch.no_grad()
def refresh_masters_from_params(optimizer: ZeroOptimizer) -> None:
    for b in optimizer.buckets:
        own = b.param_shard if optimizer.stage == 3 else b.shard_of(b.param_buffer)
        if own.data_ptr() != b.master.data_ptr():
            b.master.copy_(own)


@torch.no_grad()
def load_checkpoint_state(optimizer: ZeroOptimizer, read: ReadPiece) -> None:
    refresh_masters_from_params(optimizer)
    for b in optimizer.buckets:
        for s in b.segments:
            for name in state_names(optimizer):
                try:
                    value = read(s.param, name, (s.param_lo, s.param_hi))
                except KeyError:
                    if name == "master":
                        continue  # e.g. a checkpoint of an fp32 run: the weights are the master
                    raise
                getattr(b, name)[s.shard_lo: s.shard_hi].copy_(value.reshape(-1))
    optimizer._publish_params()


def scalar_state(optimizer: ZeroOptimizer) -> dict:
    scaler = optimizer.loss_scaler
    return {"step": optimizer.step_count,
            "loss_scaler": scaler.state_dict() if scaler is not None else None}


def load_scalar_state(optimizer: ZeroOptimizer, state: dict) -> None:
    optimizer.step_count = int(state["step"])
    if optimizer.loss_scaler is not None and state.get("loss_scaler"):
        optimizer.loss_scaler.load_state_dict(state["loss_scaler"])


@contextlib.contextmanager
def full_parameters(optimizer: ZeroOptimizer, writeback: bool = False) -> Iterator[None]:
    gatherer = optimizer.gatherer
    if gatherer is None:
        yield
        return
    gatherer.gather_all()
    try:
        yield
        if writeback:
            with torch.no_grad():
                for b in optimizer.buckets:
                    b.param_shard.copy_(b.shard_of(b.param_buffer))
    finally:
        gatherer.free_all()
