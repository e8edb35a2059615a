"""Memory accounting per rank: parameters, gradients, optimizer state and peak activations.

The model-state side is what the gradient buffer and the sharded optimizer report holding
(`optimizer.memory()`: the buffers this rank really holds), and is
compared with ZeRO's formulas (Rajbhandari et al. 2019, section 3.1): with Psi parameters, N_d
data-parallel ranks, p/g bytes per parameter and gradient element and K bytes of optimizer state
per parameter (the paper's mixed-precision Adam: p = g = 2, K = 12 -> 16 bytes/param; nanomt
keeps bf16/fp16 gradients in fp32 by default, g = 4),

    stage 0: params p Psi       grads g Psi       state K Psi
    stage 1: params p Psi       grads g Psi       state K Psi / N_d
    stage 2: params p Psi       grads g Psi / N_d state K Psi / N_d
    stage 3: params p Psi / N_d grads g Psi / N_d state K Psi / N_d

The gradient term holds at the step's peak, after backward and before the update (the
optimizer records `memory_after_backward` there), not only between steps when buffers are freed.

Activations are measured, not estimated: `PeakMemoryMeter` watches every tensor storage created
while it is active (forward and backward, including recomputation) and reports the peak of the
bytes still alive: saved activations, gradients being formed and temporaries, above what existed
before. It works on CPU, where torch keeps no allocator statistics.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

if TYPE_CHECKING:
    from nanomt.parallel.grid import ParallelGrid
    from nanomt.optim.sharded_adamw import ShardedAdamW


def zero_formula_bytes(num_params: int, dp: int, stage: int, param_bytes: int = 2,
                       grad_bytes: int = 4, state_bytes: int = 12) -> dict[str, float]:
    """ZeRO's per-rank bytes for `num_params` parameters at `stage` (module docstring)."""
    return {"params": param_bytes * num_params / (dp if stage >= 3 else 1),
            "grads": grad_bytes * num_params / (dp if stage >= 2 else 1),
            "optimizer_state": state_bytes * num_params / (dp if stage >= 1 else 1)}


class PeakMemoryMeter(TorchDispatchMode):
    """with PeakMemoryMeter() as meter: ...  ->  meter.peak_bytes (storages created inside)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def watch(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """`with meter.watch(cond):` measures only when cond holds."""
        return self if enabled else contextlib.nullcontext()

    def _forget_freed(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current_bytes -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._forget_freed()
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.live:
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.current_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out


def memory_report(optimizer: ShardedAdamW, peak_activation_bytes: int | None,
                  grid: ParallelGrid | None) -> list[dict]:
    """Every rank's accounting, gathered onto every rank (rank order): model-state bytes now
    (between steps) and at the step's peak (`after_backward`: the last step's gradients
    complete, before the update; `grads_peak_in_backward`: the most gradient bytes held at once
    during that backward, in-flight full buckets included)."""
    after_backward = optimizer.memory_after_backward
    mine = {"rank": grid.rank if grid is not None else 0, **optimizer.memory(),
            "peak_activations": peak_activation_bytes,
            "after_backward": after_backward,  # the model-state peak: gradients complete
            "peak_model_state": sum(after_backward.get(k, 0)
                                    for k in ("params", "grads", "optimizer_state"))}
    if grid is None or not grid.is_distributed:
        return [mine]
    everyone: list = [None] * grid.world_size
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


__all__ = ["PeakMemoryMeter", "memory_report", "zero_formula_bytes"]
