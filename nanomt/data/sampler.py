"""The global batch of every step, and each rank's part of it: a function of the sample stream.

A dataset is a stream of samples (nanomt.data.gpt_dataset, nanomt.data.blend), already shuffled
with the seed. Step t takes the next B_t samples of it, where B_t is the global batch size
(constant, or ramped up: nanomt.data.rampup):

    global batch of step t = samples [c_t, c_t + B_t) of the stream,  c_t = B_0 + ... + B_{t-1}

so it depends on (seed, consumed samples) only. Data-parallel rank r of dp owns rows
[r * B_t / dp, (r + 1) * B_t / dp) of it and its micro-batch i is rows [i * b, (i + 1) * b) of
that slice: every layout (dp size, micro-batch size, accumulation steps) trains on the same
samples, tensor-parallel ranks of a replica read the same rows, and a checkpoint need only
store c_t to resume the stream exactly, under any other dp or micro-batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from nanomt.data.rampup import BatchSchedule


class SampleStream(Protocol):
    """What the sampler reads: sample i is an int64 array of seq_len + 1 tokens."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


def to_inputs_targets(samples: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of s + 1 tokens -> (inputs, targets), int64 [n, s]: targets shift by one."""
    windows = torch.from_numpy(np.stack(samples).astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class GlobalBatchSampler:
    """Global batches of a sample stream by step, split by (dp rank, micro-batch)."""

    def __init__(self, stream: SampleStream, schedule: BatchSchedule | int, seed: int = 0
                 ) -> None:
        self.stream = stream
        self.schedule = schedule if isinstance(schedule, BatchSchedule) else \
            BatchSchedule(schedule)
        self.seed = seed            # recorded in checkpoints; the stream is already shuffled
        self.next_step = 0          # one past the highest step served
        self.offset = 0             # samples consumed before step 0 under this schedule

    @property
    def global_batch_size(self) -> int:
        """The full (post-ramp) global batch size."""
        return self.schedule.global_batch_size

    def batch_size(self, step: int) -> int:
        return self.schedule.batch_size(step)

    def consumed_before(self, step: int) -> int:
        return self.offset + self.schedule.consumed_before(step)

    def num_microbatches(self, dp_size: int, micro_batch_size: int, step: int = 0) -> int:
        """Micro-batches per rank at `step`: B_t / (micro_batch_size * dp_size)."""
        if dp_size < 1 or micro_batch_size < 1:
            raise ValueError("dp_size and micro_batch_size must be positive")
        size, rows = self.batch_size(step), dp_size * micro_batch_size
        if size % rows:
            raise ValueError(f"global batch {size} of step {step} is not divisible by "
                             f"dp_size * micro_batch_size = {dp_size} * {micro_batch_size}")
        return size // rows

    def sample_ids(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> range:
        """Stream positions of this rank's rows of the global batch of `step`."""
        if step < 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad step {step} or dp_rank {dp_rank} of {dp_size}")
        per_rank = self.batch_size(step) // dp_size
        first = self.consumed_before(step) + dp_rank * per_rank
        return range(first, first + per_rank)

    def micro_batch(self, step: int, micro_index: int, dp_rank: int, dp_size: int,
                    micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [micro_batch_size, seq_len], of one rank's micro-batch."""
        m = self.num_microbatches(dp_size, micro_batch_size, step)
        if not 0 <= micro_index < m:
            raise ValueError(f"micro_index {micro_index} out of range: {m} micro-batches")
        rows = self.sample_ids(step, dp_rank, dp_size)
        ids = rows[micro_index * micro_batch_size:(micro_index + 1) * micro_batch_size]
        self.next_step = max(self.next_step, step + 1)
        return to_inputs_targets([self.stream[i] for i in ids])

    def mark_served(self, step: int) -> None:
        """Record that `step` was served without reading it (pipeline stages that need no data)."""
        self.next_step = max(self.next_step, step + 1)

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole global batch of a step (tests, debugging, single-process references)."""
        return to_inputs_targets([self.stream[i] for i in self.sample_ids(step)])

    def eval_batches(self, num_batches: int, batch_size: int, dp_rank: int = 0,
                     dp_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first num_batches * batch_size samples, the same at every step; each yield is
        this rank's batch_size / dp_size rows of one batch."""
        if batch_size % dp_size:
            raise ValueError(f"eval batch_size {batch_size} is not divisible by dp_size "
                             f"{dp_size}")
        rows = batch_size // dp_size
        for b in range(num_batches):
            first = b * batch_size + dp_rank * rows
            yield to_inputs_targets([self.stream[i] for i in range(first, first + rows)])

    # -- checkpointing (nanomt.checkpoint.checkpointer.BatchSource) -----------------------
    @property
    def consumed_samples(self) -> int:
        return self.consumed_before(self.next_step)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "next_step": self.next_step,
                "consumed_samples": self.consumed_samples,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the checkpoint's consumed-sample count: if the batch schedule changed,
        the offset keeps step `next_step` starting exactly where the saved run stopped."""
        self.seed = int(state["seed"])
        self.next_step = int(state["next_step"])
        consumed = int(state.get("consumed_samples", self.consumed_before(self.next_step)))
        self.offset = consumed - self.schedule.consumed_before(self.next_step)
