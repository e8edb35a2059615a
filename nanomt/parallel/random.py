"""Random streams for dropout under tensor parallelism (Megatron's RNG tracker).

Two kinds of dropout live in a tensor-parallel layer:
  - outside the split regions (embedding and residual dropout on the replicated hidden state):
    every tp rank holds the same tensor, so the masks must be identical: the default generator,
    seeded the same on every tp rank (seed + 100 * pp_rank, as Megatron).
  - inside them (attention-probability dropout on this rank's heads; residual dropout on this
    rank's sequence shard under sequence parallelism): each rank owns different elements, so the
    masks must differ: a second stream seeded seed + 2718 + tp_rank, entered with `fork()`.
    Each model chunk has its own tracker, so the stream is also offset by the chunk's first
    layer: pipeline stages and the v chunks of one rank draw different masks.

The tracker's state is part of every checkpoint so a resumed run draws the same masks.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch

TP_SEED_OFFSET = 2718
CHUNK_SEED_STRIDE = 65_536  # more than any tp size: (stream, tp_rank) never collide


def seed_everything(seed: int, pp_rank: int = 0) -> None:
    """Seed Python and torch's default generators identically on every tp and dp rank."""
    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)


class TensorParallelRNG:
    """A private generator state for dropout inside tensor-parallel regions.

    `fork()` swaps it in for the default generator of the device dropout runs on: the CPU's,
    and the current GPU's once CUDA is in use (`torch.cuda.is_initialized()`: the model is on a
    GPU). The GPU stream is made from the seed the first time it is needed, so a run on the CPU
    (train.device=cpu on a GPU host too) never touches CUDA.
    """

    def __init__(self, seed: int, tp_rank: int, stream: int = 0):
        self.seed = seed + TP_SEED_OFFSET + tp_rank + CHUNK_SEED_STRIDE * stream
        # Fresh generators: seeding them leaves the default streams untouched.
        self.states = {"cpu": torch.Generator().manual_seed(self.seed).get_state()}

    def _devices_in_use(self) -> list[str]:
        """The devices whose default generator dropout may draw from; creates the GPU's stream
        from the seed the first time CUDA is found in use."""
        if not torch.cuda.is_initialized():
            return ["cpu"]
        if "cuda" not in self.states:
            self.states["cuda"] = torch.Generator(device="cuda").manual_seed(self.seed).get_state()
        return ["cpu", "cuda"]

    @staticmethod
    def _get_default_state(device: str) -> torch.Tensor:
        return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()

    @staticmethod
    def _set_default_state(device: str, state: torch.Tensor) -> None:
        if device == "cuda":
            torch.cuda.set_rng_state(state)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Draw from the tensor-parallel stream inside the block, then switch back."""
        devices = self._devices_in_use()
        outer = {device: self._get_default_state(device) for device in devices}
        for device in devices:
            self._set_default_state(device, self.states[device])
        try:
            yield
        finally:
            for device in devices:
                self.states[device] = self._get_default_state(device)
                self._set_default_state(device, outer[device])

    def state_dict(self) -> dict:
        self._devices_in_use()  # a GPU run's state always holds the GPU stream
        return {device: state.clone() for device, state in self.states.items()}

    def load_state_dict(self, state: dict) -> None:
        if "state" in state:  # the earlier single-device format
            state = {"cpu": state["state"]}
        for device, value in state.items():
            self.states[device] = value.clone()
