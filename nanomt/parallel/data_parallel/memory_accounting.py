"""Memory accounting for the gradient buffer: the bytes a rank holds for parameters and
gradients, and the peak of the gradient bytes within a step.

What it buys: the numbers that ZeRO's memory claims are checked against (tests/test_zero.py
compares them with Rajbhandari et al.'s formulas and with nanomt.memory's dispatch meter) and
that the run's memory report prints (nanomt.memory). Counting storages, not tensors: a view
shares its base's bytes, and a ZeRO-3 buffer resized to zero holds none.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def storage_bytes(tensor: torch.Tensor | None) -> int:
    """Bytes of the storage behind `tensor` (0 for None, and once a ZeRO-3 buffer is freed)."""
    return 0 if tensor is None else tensor.untyped_storage().nbytes()


def distinct_storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes behind `tensors`, each storage counted once (a view shares its base's)."""
    storages = {t.untyped_storage().data_ptr(): storage_bytes(t) for t in tensors
                if t is not None and storage_bytes(t) > 0}
    return sum(storages.values())


class GradientMemoryMeter:
    """Mixed into GradientBuffer: `memory()` now, and the gradient bytes' peak in this step
    (`peak_grad_bytes`, reset by zero_grad; ZeRO-2/3 count each full buffer they allocate and
    free)."""

    grad_bytes_now = peak_grad_bytes = 0

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds now for parameters and gradients (in flight included)."""
        params = sum(storage_bytes(b.param_buffer) + storage_bytes(b.param_shard)
                     for b in self.buckets)
        grads = distinct_storage_bytes([t for b in self.buckets
                                        for t in (b.grad_buffer, b.grad_shard)]
                                       + [r.full for r in self.in_flight])
        return {"params": params, "grads": grads}

    def _count_grad_bytes(self, delta: int) -> None:
        """The gradient bytes held now and their peak in this step (in flight included)."""
        self.grad_bytes_now += delta
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.grad_bytes_now)
