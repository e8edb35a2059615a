"""Point-to-point communication between neighbouring pipeline stages.

Forward, a stage sends its chunk's output activation to the rank holding the next chunk;
backward, it sends the gradient of its chunk's input to the rank holding the previous chunk.
Chunk k lives on pipeline rank k mod p, so the next chunk is always on pipeline rank r+1 and the
previous on r-1, wrapping around between the last and first rank under interleaving (Narayanan
et al. 2021, section 2.2.2).

Every message has a shape known up front ([s, b, h], or the sequence shard [s/t, b, h] under
sequence parallelism), so the receiver allocates its buffer before the data arrives.

Scatter-gather (Megatron's scatter_gather_tensors_in_pipeline; Narayanan et al. 2021, section
4.1): without sequence parallelism the t tensor-parallel ranks of a stage hold the same
activation (and input gradient), so sending it whole from each would move it t times. Instead tp
rank j sends only the j-th of t equal contiguous pieces of the flattened tensor, s*b*h/t
elements, to tp rank j of the neighbouring stage, and the receiver all-gathers the pieces over
its tp group when the pass takes its input (`arrived`). Under sequence parallelism each tp rank
already holds its own shard [s/t, b, h]: it travels whole. Which
`Transfer`s go out together (one `batch_isend_irecv` per unit) is the engine's plan
(posting.py; NCCL's rules: docs/pipeline.md). Activations travel on the grid's `pp_group`,
gradients on `pp_grad_group` (the same ranks): two queues, so a receive posted early on one
never holds up the other direction. A posted unit is one `P2PBatch`: NCCL returns a single work
for the whole batch, Gloo one per operation; the handle waits for all.

Before the first message, `agree_on_schedule` all-gathers each rank's view of the schedule (kind,
micro-batches, chunks, shape, dtype) over the pipeline group, once per distinct schedule:
ranks that disagree would wait on each other forever, so they fail together with a clear error.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanomt.parallel import comm
from nanomt.parallel.pipeline.schedules import PipelineOp

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Transfer:
    """One send or receive: of the pass `op` (its output, or its input), with pipeline rank
    `peer`, under `tag`."""

    is_send: bool
    op: PipelineOp
    peer: int
    tag: int


class P2PBatch:
    """The handle of one posted unit: done when every send and receive in it is done."""

    def __init__(self, works: list, group):
        self.works, self.group = works, group

    def wait(self) -> None:
        comm.note_operation("wait for pipeline send/recv", self.group)
        for work in self.works:
            work.wait()

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


class PipelineComm:
    """Sends and receives of one pipeline rank, with its neighbours in the grid's pp groups:
    `groups[queue]` (posting.ACTIVATION: pp_group, posting.GRADIENT: pp_grad_group)."""

    def __init__(self, grid, activation_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, scatter_gather: bool = False):
        self.grid = grid
        self.groups = (grid.pp_group, grid.pp_grad_group)
        self.shape, self.dtype, self.device = tuple(activation_shape), dtype, device
        self.tp_group = grid.tp_group
        self.tp_rank, tp = comm.rank_and_size(grid.tp_group)
        numel = math.prod(self.shape)
        self.pieces = tp if scatter_gather and tp > 1 else 1
        if numel % self.pieces:
            raise ValueError(f"a {self.shape} activation does not split into {tp} equal pieces")
        self.wire_shape = (numel // self.pieces,) if self.pieces > 1 else self.shape

    def piece(self, tensor: torch.Tensor) -> torch.Tensor:
        """What this rank sends of a full message: its 1/t of the flattened tensor under
        scatter-gather (a contiguous view), else the tensor itself."""
        tensor = tensor.contiguous()
        if self.pieces == 1:
            return tensor
        return tensor.view(-1).chunk(self.pieces)[self.tp_rank]

    def arrived(self, buffer: torch.Tensor) -> torch.Tensor:
        """A completed receive buffer as the full message: the tp ranks' pieces all-gathered
        (counted by comm's traffic log), or the buffer itself without scatter-gather."""
        if self.pieces == 1:
            return buffer
        full = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        comm.all_gather_into(full.view(-1), buffer, self.tp_group)
        return full

    def post(self, transfers: list[tuple[Transfer, torch.Tensor | None]], queue: int
             ) -> tuple[P2PBatch | None, dict]:
        """Post one unit on `queue`: (transfer, tensor to send or None for a receive) in plan
        order. Returns the unit's handle and the receive buffers by pass."""
        ops, buffers, group = [], {}, self.groups[queue]
        for transfer, tensor in transfers:
            peer = self.grid.pp_ranks[transfer.peer]
            if transfer.is_send:
                piece = self.piece(tensor)
                comm.record_send(piece, group)
                ops.append(dist.P2POp(dist.isend, piece, peer, group, transfer.tag))
            else:
                buffer = torch.empty(self.wire_shape, dtype=self.dtype, device=self.device)
                buffers[transfer.op] = buffer
                ops.append(dist.P2POp(dist.irecv, buffer, peer, group, transfer.tag))
        if not ops:
            return None, buffers
        comm.note_operation("pipeline send/recv", group)
        return P2PBatch(dist.batch_isend_irecv(ops), group), buffers

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
    when the signatures first appear, which is the first step of a run."""
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
    # NCCL creates a group's communicator at its first operation, which every member must join:
    # open the gradients' queue here, together, before a rank's first batch lands on it.
    comm.note_operation("all_reduce (open the gradient queue)", grid.pp_grad_group)
    dist.all_reduce(torch.zeros(1, device=device), group=grid.pp_grad_group)
    agreed.add(key)


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES)
