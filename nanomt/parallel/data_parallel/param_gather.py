"""ZeRO-1/2: the updated parameters' all-gather overlapped with the next forward (Megatron's
overlap_param_gather; parallel.overlap_param_gather, off by default).

After the optimizer step each dp rank has updated only its shard of every bucket; an all-gather
gives every rank the whole bucket again (Psi of traffic per step). Waiting for it at the end of
the step leaves the compute idle while it runs. With parallel.overlap_param_gather the gathers
are launched asynchronously instead, in the order the forward first uses the buckets, and a
forward pre-hook on every module that owns parameters waits only for the buckets holding them,
so the gathers of later layers run while earlier layers compute:

    step:     AdamW on my shards -> launch all-gather(bucket), first-used bucket first -> return
    forward:  module m starts -> wait for the gathers of m's buckets -> compute m -> ...

A module hook fires only when the module is called. A model may read a parameter without
calling its module (GPT's head reads the output or tied embedding weight directly), so the first
forward of every chunk records which modules it called, and from then on the chunk's own
pre-hook waits for the buckets of the modules it did not call; until that first forward is
done, it waits for all of its buckets. Whatever reads the parameters outside a forward (a
checkpoint save, the next update) calls `wait_all` first. The values are the same as with the
synchronous gather; only the moment of the wait moves.

What it buys, measured (docs/performance.md, dp=2 on a 2-core CPU with gloo, 5 rounds): nothing
beyond the noise (ZeRO-1 76.1 vs 71.2 ms, ZeRO-2 78.1 vs 77.2 ms), because gloo's transfers run
on the same cores as the compute. The argument for a GPU: NCCL runs the gather on its own
stream, so the step no longer ends with Psi of traffic that the compute waits for; this is how
Megatron takes the gather off the critical path. Not measured on a GPU yet.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from nanomt.parallel import comm


class ChunkRecord:
    """What one model chunk's forward needs: every bucket it holds, the buckets of each module
    that owns parameters, and (after its first forward) those of the modules it never calls."""

    def __init__(self, all_indices: tuple, owners: dict[nn.Module, tuple]):
        self.all_indices, self.owners = all_indices, owners
        self.called: set[nn.Module] = set()
        self.read_without_a_call: tuple | None = None


class PendingParamGathers:
    """The parameter all-gathers a step launched and no one has waited for, by bucket index."""

    def __init__(self, chunks: list[nn.Module], buckets: list):
        bucket_index_of = {id(p): b.index for b in buckets for p in b.params}
        self.buckets = buckets
        self.pending: dict[int, dist.Work] = {}  # bucket index -> its all-gather in flight
        self.use_order: list[int] = []  # bucket indices as the forward first waits for them
        self.waited_in_forward = 0
        self.hooks = []
        for chunk in chunks:
            owners = {module: self._indices(module, bucket_index_of, recurse=False)
                      for module in chunk.modules()}
            owners = {module: indices for module, indices in owners.items() if indices}
            record = ChunkRecord(self._indices(chunk, bucket_index_of, recurse=True), owners)
            self.hooks.append(chunk.register_forward_pre_hook(partial(self._chunk_starts, record)))
            self.hooks.append(chunk.register_forward_hook(partial(self._chunk_ends, record)))
            for module, indices in owners.items():
                self.hooks.append(module.register_forward_pre_hook(
                    partial(self._module_starts, record, indices)))

    @staticmethod
    def _indices(module: nn.Module, bucket_index_of: dict[int, int], recurse: bool) -> tuple:
        return tuple(sorted({bucket_index_of[id(p)] for p in module.parameters(recurse=recurse)
                             if id(p) in bucket_index_of}))

    def launch_order(self, num_buckets: int) -> list[int]:
        """Bucket indices in the order the forward first needs them (the rest after, last
        bucket first: buckets fill in backward order)."""
        rest = [i for i in reversed(range(num_buckets)) if i not in self.use_order]
        return self.use_order + rest

    def launch_all(self, buckets: list, own_shard: Callable[..., torch.Tensor]) -> None:
        """Start every bucket's all-gather, first-needed first, and leave it in flight."""
        for index in self.launch_order(len(buckets)):
            b = buckets[index]
            work = comm.all_gather_into(b.param_buffer, own_shard(b), b.group, async_op=True)
            if work is not None:
                self.pending[index] = work

    def wait(self, indices) -> int:
        """Wait for the pending gathers of `indices`; returns how many there were."""
        due = [index for index in indices if index in self.pending]
        if due:
            comm.note_operation("wait for all_gather (parameters)", self.buckets[due[0]].group)
        for index in due:
            self.pending.pop(index).wait()
        return len(due)

    def wait_all(self) -> None:
        self.wait(list(self.pending))

    def _module_starts(self, record: ChunkRecord, indices: tuple, module: nn.Module, args) -> None:
        if record.read_without_a_call is None:  # the chunk's first forward: note what it uses
            record.called.add(module)
            self.use_order += [index for index in indices if index not in self.use_order]
        self.waited_in_forward += self.wait(indices)

    def _chunk_starts(self, record: ChunkRecord, chunk: nn.Module, args) -> None:
        """Before the chunk runs: the buckets of the modules its forward does not call (all of
        its buckets until its first forward has shown which those are)."""
        known = record.read_without_a_call is not None
        self.waited_in_forward += self.wait(record.read_without_a_call if known
                                            else record.all_indices)

    def _chunk_ends(self, record: ChunkRecord, chunk: nn.Module, args, output) -> None:
        if record.read_without_a_call is None:
            uncalled = [indices for module, indices in record.owners.items()
                        if module not in record.called]
            record.read_without_a_call = tuple(sorted({i for ix in uncalled for i in ix}))
            # waited for as the chunk starts: gathered first
            self.use_order[:0] = [i for i in record.read_without_a_call
                                  if i not in self.use_order]


class OverlappedParamGather:
    """Mixed into the ZeRO-1/2 buffers before GradientBuffer: with overlap_param_gather (and
    dp > 1), the parameters' all-gathers are left in flight after the step."""

    param_gathers: PendingParamGathers | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if kwargs.get("overlap_param_gather") and self.gathers_params_after_step and self.dp > 1:
            self.param_gathers = PendingParamGathers(self.chunks, self.buckets)

    def _all_gather_params(self) -> None:
        if self.param_gathers is None:
            super()._all_gather_params()
        else:
            self.param_gathers.launch_all(self.buckets, self.own_param_shard)

    def wait_for_params(self) -> None:
        if self.param_gathers is not None:
            self.param_gathers.wait_all()
