"""ZeRO-1/2: the updated parameters' all-gather overlapped with the next forward (Megatron's
overlap_param_gather).

After the optimizer step each dp rank has updated only its shard of every bucket; an all-gather
gives every rank the whole bucket again (Psi of traffic per step). Waiting for it at the end of
the step leaves the compute idle while it runs. With parallel.overlap_param_gather the gathers
are launched asynchronously instead, and a forward pre-hook on every module that owns
parameters waits only for the buckets holding them, so the gathers of later layers run while
earlier layers compute:

    step:     AdamW on my shards -> launch all-gather(bucket) for every bucket -> return
    forward:  module m starts -> wait for the gathers of m's buckets -> compute m -> ...

Whatever reads the parameters outside a forward (a checkpoint save, the next step's update)
calls `wait_all` first. The values are the same as with the synchronous gather; only the moment
the wait happens moves.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


class PendingParamGathers:
    """The parameter all-gathers launched by a step and not yet waited for, by bucket index."""

    def __init__(self, chunks: list[nn.Module], bucket_index_of: dict[int, int]):
        """bucket_index_of: id(param) -> the index of the bucket that holds it."""
        self.pending: dict[int, tuple[object, torch.Tensor]] = {}  # index -> (handle, sent)
        self.launched = self.waited_in_forward = 0
        self.hooks = []
        for chunk in chunks:
            for module in chunk.modules():
                indices = sorted({bucket_index_of[id(p)] for p in module.parameters(recurse=False)
                                  if id(p) in bucket_index_of})
                if indices:
                    self.hooks.append(module.register_forward_pre_hook(
                        partial(self._before_forward, tuple(indices))))

    def launch(self, index: int, handle, sent: torch.Tensor) -> None:
        """Remember bucket `index`'s gather (`sent`: the input, kept alive until it is done)."""
        if handle is not None:
            self.pending[index] = (handle, sent)
            self.launched += 1

    def wait(self, indices) -> int:
        """Wait for the pending gathers of `indices`; returns how many there were."""
        waited = 0
        for index in indices:
            entry = self.pending.pop(index, None)
            if entry is not None:
                entry[0].wait()
                waited += 1
        return waited

    def wait_all(self) -> None:
        self.wait(list(self.pending))

    def _before_forward(self, indices: tuple[int, ...], module: nn.Module, args) -> None:
        self.waited_in_forward += self.wait(indices)
