"""Point-to-point messages between neighbouring pipeline stages, on one communicator.

Forward, a stage sends its chunk's output activation to the rank holding the next chunk;
backward, it sends the gradient of its chunk's input to the rank holding the previous chunk.
Chunk k lives on pipeline rank k mod p, so the next chunk is always on pipeline rank r+1 and the
previous on r-1, wrapping around between the last and first rank under interleaving (Narayanan
et al. 2021, section 2.2.2).

Every message has a shape known up front ([s, b, h], or the sequence shard [s/t, b, h] under
sequence parallelism), so the receiver allocates its buffer before the data arrives. All of a
rank's messages go on the grid's pp_group, one `batch_isend_irecv` per batch of posting.py's
plan (NCCL's ordering rule: docs/pipeline.md). NCCL returns a single work for a whole batch,
gloo one per operation; `P2PBatch` waits for all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanomt.parallel import comm
from nanomt.parallel.pipeline.posting import Transfer
from nanomt.parallel.pipeline.schedules import PipelineOp


class P2PBatch:
    """The handle of one posted batch: done when every send and receive in it is done."""

    def __init__(self, works: list, group):
        self.works, self.group = works, group

    def wait(self) -> None:
        comm.note_operation("wait for pipeline send/recv", self.group)
        for work in self.works:
            work.wait()


class PipelineP2P:
    """The sends and receives of one pipeline rank with its neighbours in the grid's pp_group."""

    def __init__(self, grid, activation_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device):
        self.grid, self.group = grid, grid.pp_group
        self.shape, self.dtype, self.device = tuple(activation_shape), dtype, device
        self.wire_shape = self.shape  # what travels: the whole message

    def to_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """What this rank sends of a message."""
        return tensor.contiguous()

    def arrived(self, buffer: torch.Tensor) -> torch.Tensor:
        """A completed receive buffer as the message a pass takes."""
        return buffer

    def post(self, transfers: tuple[Transfer, ...], sending: dict[PipelineOp, torch.Tensor]
             ) -> tuple[P2PBatch, dict[PipelineOp, torch.Tensor]]:
        """Post one batch: the sends (tensors in `sending`, by pass) and receives of
        `transfers`, in plan order. Returns its handle and the receive buffers by pass."""
        ops, buffers = [], {}
        for transfer in transfers:
            peer = self.grid.pp_ranks[transfer.peer]
            if transfer.is_send:
                tensor = self.to_wire(sending[transfer.op])
                ops.append(dist.P2POp(dist.isend, tensor, peer, self.group, transfer.tag))
            else:
                buffer = torch.empty(self.wire_shape, dtype=self.dtype, device=self.device)
                buffers[transfer.op] = buffer
                ops.append(dist.P2POp(dist.irecv, buffer, peer, self.group, transfer.tag))
        comm.note_operation("pipeline send/recv", self.group)
        return P2PBatch(dist.batch_isend_irecv(ops), self.group), buffers
