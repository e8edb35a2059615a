"""Scatter-gather of pipeline messages: t times less traffic between stages.

Without sequence parallelism the t tensor-parallel ranks of a stage hold the same activation
(and input gradient), so sending it whole from each would move it t times over the pipeline
link. Instead tp rank j sends only the j-th of t equal contiguous pieces of the flattened
tensor, s*b*h/t elements, to tp rank j of the neighbouring stage, and the receiver all-gathers
the pieces over its tp group when the pass takes its input (Narayanan et al. 2021, section 4.1;
Megatron's scatter_gather_tensors_in_pipeline).

The GPU-side argument: the pipeline link usually crosses nodes (InfiniBand, about 50 GB/s per
H100) while the tp group sits inside one (NVLink, about 450 GB/s per direction), so moving 1/t
over the slow link and the rest over the fast one shortens each message. No CPU measurement can show it (gloo has
one link speed). It replaces the core `PipelineP2P` whenever tp > 1 without sequence
parallelism (no knob: h is a multiple of t whenever tp is valid, so the pieces are always
equal); under sequence parallelism each tp rank holds its own shard [s/t, b, h], which travels
whole through the core.
"""

from __future__ import annotations

import math

import torch

from nanomt.parallel import comm
from nanomt.parallel.pipeline.p2p import PipelineP2P


class ScatterGatherP2P(PipelineP2P):
    """PipelineP2P that sends each tp rank's 1/t of a message and all-gathers it on arrival."""

    def __init__(self, grid, activation_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device):
        super().__init__(grid, activation_shape, dtype, device)
        self.tp_group = grid.tp_group
        self.tp_rank, self.pieces = comm.rank_and_size(grid.tp_group)
        numel = math.prod(self.shape)
        if numel % self.pieces:
            raise ValueError(f"a {self.shape} activation does not split into {self.pieces} "
                             f"equal pieces")
        self.wire_shape = (numel // self.pieces,)

    def to_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """This tp rank's 1/t of the flattened message (a contiguous view)."""
        return tensor.contiguous().view(-1).chunk(self.pieces)[self.tp_rank]

    def arrived(self, buffer: torch.Tensor) -> torch.Tensor:
        """The tp ranks' pieces all-gathered into the whole message."""
        full = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        comm.all_gather_into(full.view(-1), buffer, self.tp_group)
        return full
