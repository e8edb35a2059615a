"""Test-side probes of the pipeline engine (test code, kept out of the package).

`recording_pipeline()` swaps the engine's PipelineStep (and the zero-bubble schedules' steps,
forward_backward.ZERO_BUBBLE_STEPS) for subclasses that record, per step,
the passes as run, the most micro-batches in flight, the outputs sent and freed and the bytes of
produced outputs not yet freed (`PipelineStats`). `SavedActivationMeter` counts what autograd
saves, independently of the engine; `one_work_per_batch` mimics NCCL's single work per batch.
"""

from __future__ import annotations

import contextlib
import unittest.mock
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

from nanomt.parallel.pipeline import engine


@dataclass
class PipelineStats:
    """What a step held: the most micro-batch passes in flight at once, and output bytes kept."""

    peak_in_flight: int = 0
    peak_unfreed_output_bytes: int = 0
    outputs_sent: int = 0
    outputs_freed: int = 0
    op_order: list[str] = field(default_factory=list)


class Recording:
    """Mixed into a PipelineStep (or a subclass): notes what it does in `self.stats` (the last
    step run; a zero-bubble step's W passes arrive through its backward)."""

    last: PipelineStats | None = None

    def run(self):
        self.stats = Recording.last = PipelineStats()
        return super().run()

    def forward(self, op) -> None:
        self.stats.op_order.append(str(op))
        super().forward(op)
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, len(self.in_flight))
        unfreed = sum(t.numel() * t.element_size() for p, t in self.outgoing.items()
                      if p.kind == "F")
        self.stats.peak_unfreed_output_bytes = max(self.stats.peak_unfreed_output_bytes,
                                                   unfreed)

    def backward(self, op) -> None:
        self.stats.op_order.append(str(op))
        super().backward(op)

    def sent(self, op, tensor) -> None:
        storage = tensor.untyped_storage().nbytes()
        super().sent(op, tensor)
        if op.kind == "F":
            self.stats.outputs_sent += 1
            self.stats.outputs_freed += tensor.untyped_storage().nbytes() < storage


@contextlib.contextmanager
def recording_pipeline() -> Iterator[type[Recording]]:
    """Within the block, pipeline steps record their stats (Recording.last)."""
    from nanomt.parallel import forward_backward

    def recording(step: type) -> type:
        return type(f"Recording{step.__name__}", (Recording, step), {})

    layers = {name: recording(step) for name, step in forward_backward.ZERO_BUBBLE_STEPS.items()}
    with unittest.mock.patch.object(engine, "PipelineStep", recording(engine.PipelineStep)), \
            unittest.mock.patch.dict(forward_backward.ZERO_BUBBLE_STEPS, layers):
        yield Recording


def one_work_per_batch(ops, one_per_op):
    """Mimics NCCL's batch_isend_irecv on gloo: ONE work for the whole batch (gloo returns one
    per op)."""
    class CoalescedWork:
        def __init__(self, works):
            self.works = works

        def wait(self):
            return all(work.wait() for work in self.works)

        def is_completed(self):
            return all(work.is_completed() for work in self.works)

    return [CoalescedWork(one_per_op(ops))]


class SavedActivationMeter:
    """Independent of the engine's counters: the bytes of tensors autograd saves for backward
    (parameters excluded), counted while alive (weakref finalizers), and their peak."""

    def __init__(self, params):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.bytes = self.peak = 0

    def pack(self, tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in self.param_ptrs or tensor.numel() == 0:
            return tensor
        entry = self.live.setdefault(ptr, [0, tensor.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        weakref.finalize(tensor, self.release, ptr)
        return tensor

    def release(self, ptr):
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[ptr]
