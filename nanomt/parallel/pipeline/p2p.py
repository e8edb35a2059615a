"""Point-to-point communication between neighbouring pipeline stages.

Forward, a stage sends its chunk's output activation to the rank holding the next chunk;
backward, it sends the gradient of its chunk's input to the rank holding the previous chunk.
Chunk k lives on pipeline rank k mod p, so the next chunk is always on pipeline rank r+1 and the
previous on r-1, wrapping around between the last and first rank under interleaving.

Every message has a shape known up front ([b, s, h], or the sequence shard [b, s/t, h] under
sequence parallelism), so the receiver allocates its buffer before the data arrives, and a tag
naming what it carries (activation or gradient, chunk, micro-batch), so a message can never be
taken for another one even when two ranks exchange several at once. After each pass a rank posts
its send together with the receive its next pass needs, in one `batch_isend_irecv`, and then
waits only for the receive: a send never blocks, so any deadlock-free order (see
schedules.check_deadlock_free) runs without deadlocking, whatever the relative speed of ranks.

Before the first message, `agree_on_schedule` all-gathers each rank's view of the schedule (kind,
micro-batches, chunks, shape, dtype) over the pipeline group: ranks that disagree would wait on
each other forever, so they fail together with a clear error instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

ACTIVATION, GRADIENT = 0, 1
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Message:
    """What one receive expects: from which rank, under which tag."""

    peer: int
    tag: int


def message_tag(kind: int, global_chunk: int, microbatch: int, num_microbatches: int) -> int:
    """A tag unique within one schedule: (chunk that receives it, micro-batch, kind)."""
    return (global_chunk * num_microbatches + microbatch) * 2 + kind


class PipelineComm:
    """Sends and receives of one pipeline rank, with its neighbours in the grid's pp group."""

    def __init__(self, grid, activation_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device):
        self.grid = grid
        self.group = grid.pp_group
        pp, r = grid.pp_size, grid.pp_rank
        self.prev_rank = grid.pp_ranks[(r - 1) % pp]
        self.next_rank = grid.pp_ranks[(r + 1) % pp]
        self.shape, self.dtype, self.device = tuple(activation_shape), dtype, device

    def exchange(self, sends: list[tuple[torch.Tensor, Message]], receive: Message | None):
        """Post `sends` and `receive` together. Returns (buffer, receive work, send works)."""
        ops = [dist.P2POp(dist.isend, tensor.contiguous(), msg.peer, self.group, msg.tag)
               for tensor, msg in sends]
        buffer = None
        if receive is not None:
            buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, buffer, receive.peer, self.group, receive.tag))
        works = dist.batch_isend_irecv(ops) if ops else []
        if receive is None:
            return None, None, works
        return buffer, works[-1], works[:-1]

    def check_outgoing(self, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ValueError(
                f"pipeline rank {self.grid.pp_rank} would send a {tuple(tensor.shape)} "
                f"{tensor.dtype} tensor but its neighbours expect {self.shape} {self.dtype}: "
                f"stage outputs must keep the activation shape")


def agree_on_schedule(grid, signature: dict[str, int]) -> None:
    """All-gather `signature` over the pipeline group; ValueError on every rank if they differ."""
    if grid.pp_group is None or grid.pp_size == 1:
        return
    keys = sorted(signature)
    mine = torch.tensor([int(signature[k]) for k in keys], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(grid.pp_size)]
    dist.all_gather(everyone, mine, group=grid.pp_group)
    if any(not torch.equal(other, mine) for other in everyone):
        table = "; ".join(f"pp rank {r}: " + ", ".join(f"{k}={int(v)}" for k, v in zip(keys, row))
                          for r, row in enumerate(everyone))
        raise ValueError(f"pipeline ranks disagree on the schedule and would deadlock: {table}")


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES)
