"""Activation checkpointing: keep less, recompute in backward (Chen et al. 2016; Korthikanti et
al. 2022, "Reducing Activation Recomputation in Large Transformer Models").

Activation bytes per layer, 16-bit, tensor parallel t with sequence parallelism (Korthikanti
eq. 2-6):
    none       (s b h / t) (34 + 5 a s / h)   every intermediate is kept for backward
    selective  (s b h / t) 34                 the attention core (softmax, dropout mask, its
                                              a s^2 terms) is recomputed: cheap FLOPs, big memory
    full       2 s b h                        only the layer's input is kept; the whole layer
                                              runs again in backward (MT-NLG trained this way)

A recompute must draw the same dropout masks as the forward it replays: torch's checkpoint
restores the default generator, and `checkpoint` below also rewinds the tensor-parallel RNG
tracker (nanomt.parallel.random) to the state it had when the forward started.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from nanomt.config_rules import CHECKPOINTING_MODES
from nanomt.parallel.random import TensorParallelRNG

_replaying = False  # inside a recompute: layers that count things (MoE load) count once


def recomputing() -> bool:
    """Whether the forward running now is a recompute in backward."""
    return _replaying


@contextlib.contextmanager
def _replay_flag() -> Iterator[None]:
    global _replaying
    before, _replaying = _replaying, True
    try:
        yield
    finally:
        _replaying = before


@contextlib.contextmanager
def _replay(rng: TensorParallelRNG | None, state: dict | None) -> Iterator[None]:
    """A recompute: flagged, with the tracker rewound to `state` when there is one."""
    with _replay_flag(), (_tracker_at(rng, state) if rng is not None
                          else contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def _tracker_at(rng: TensorParallelRNG, state: dict) -> Iterator[None]:
    """Run the block with the tracker rewound to `state`; leave it where it was afterwards."""
    current = rng.state_dict()
    rng.load_state_dict(state)
    try:
        yield
    finally:
        rng.load_state_dict(current)


def checkpoint(function: Callable, *args: torch.Tensor,
               rng: TensorParallelRNG | None = None) -> torch.Tensor:
    """function(*args), keeping only its inputs for backward and recomputing the rest there."""
    tracker_state = rng.state_dict() if rng is not None else None

    def contexts():
        return contextlib.nullcontext(), _replay(rng, tracker_state)

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                             context_fn=contexts, preserve_rng_state=True)


def set_activation_checkpointing(model_chunks: nn.Module | list[nn.Module], mode: str) -> None:
    """Switch every transformer layer of the chunks to `mode` (train.activation_checkpointing)."""
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"train.activation_checkpointing must be one of {CHECKPOINTING_MODES}, "
                         f"got {mode!r}")
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        for module in chunk.modules():
            if hasattr(module, "recompute"):
                module.recompute = mode
