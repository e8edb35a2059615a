"""Random streams for dropout under tensor parallelism (Megatron's RNG tracker).

Two kinds of dropout live in a tensor-parallel layer:
  - outside the split regions (embedding and residual dropout on the replicated hidden state):
    every tp rank holds the same tensor, so the masks must be identical: the default generator,
    seeded the same on every tp rank (seed + 100 * pp_rank, as Megatron).
  - inside them (attention-probability dropout on this rank's heads; residual dropout on this
    rank's sequence shard under sequence parallelism): each rank owns different elements, so the
    masks must differ: a second stream seeded seed + 2718 + tp_rank, entered with `fork()`.

The tracker's state is part of every checkpoint so a resumed run draws the same masks.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch

TP_SEED_OFFSET = 2718


def seed_everything(seed: int, pp_rank: int = 0) -> None:
    """Seed Python and torch's default generators identically on every tp and dp rank."""
    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)


class TensorParallelRNG:
    """A private generator state for dropout inside tensor-parallel regions."""

    def __init__(self, seed: int, tp_rank: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        saved = self._get_default_state()
        torch.manual_seed(seed + TP_SEED_OFFSET + tp_rank)
        self.state = self._get_default_state()
        self._set_default_state(saved)

    def _get_default_state(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set_default_state(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Draw from the tensor-parallel stream inside the block, then switch back."""
        outer = self._get_default_state()
        self._set_default_state(self.state)
        try:
            yield
        finally:
            self.state = self._get_default_state()
            self._set_default_state(outer)

    def state_dict(self) -> dict:
        return {"state": self.state.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.state = state["state"].clone()
