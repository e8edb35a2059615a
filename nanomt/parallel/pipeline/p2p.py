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

Before the first message, `agree_on_schedule` all-gathers each rank's view of the schedule (kind,
micro-batches, chunks, shape, dtype) over the pipeline group, once per distinct schedule:
ranks that disagree would wait on each other forever, so they fail together with a clear error.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from nanomt.parallel import comm
from nanomt.parallel.pipeline.posting import Transfer
from nanomt.parallel.pipeline.schedules import PipelineOp

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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

    def check_outgoing(self, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ValueError(
                f"pipeline rank {self.grid.pp_rank} would send a {tuple(tensor.shape)} "
                f"{tensor.dtype} tensor but its neighbours expect {self.shape} {self.dtype}: "
                f"stage outputs must keep the activation shape")


# Signatures every pipeline group has already agreed on (checked once, not every step).
_AGREED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def agree_on_schedule(grid, signature: dict[str, int], device: torch.device) -> None:
    """All-gather `signature` over the pipeline group; ValueError on every rank if they differ.

    Runs once per distinct signature (then cached), on a tensor on `device`: an NCCL group has
    no CPU path. A rank whose signature is cached skips the check, so a disagreement is caught
    when the signatures first appear, which is the first step of a run. Being the first
    operation on pp_group, it also opens the NCCL communicator with every member, as torch
    requires before a batch_isend_irecv that not every member joins."""
    if grid.pp_group is None or grid.pp_size == 1:
        return
    keys = sorted(signature)
    key = tuple((k, int(signature[k])) for k in keys)
    agreed = _AGREED.setdefault(grid, set())
    if key in agreed:
        return
    mine = torch.tensor([value for _, value in key], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(grid.pp_size)]
    comm.note_operation("all_gather (schedule check)", grid.pp_group)
    dist.all_gather(everyone, mine, group=grid.pp_group)
    if any(not torch.equal(other, mine) for other in everyone):
        table = "; ".join(f"pp rank {r}: " + ", ".join(f"{k}={int(v)}" for k, v in zip(keys, row))
                          for r, row in enumerate(everyone))
        raise ValueError(f"pipeline ranks disagree on the schedule and would deadlock: {table}")
    agreed.add(key)


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES)
