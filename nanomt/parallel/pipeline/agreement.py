"""Pipeline ranks that disagree fail together with a clear error, instead of waiting forever.

A pipeline rank posts receives for the messages its schedule expects, of the shape and dtype it
expects. Ranks that run different schedules (another number of micro-batches, of chunks, a
forward-only step on one side) or expect different shapes would wait on each other forever. So
before its first message a rank all-gathers its view of the schedule over the pipeline group,
once per distinct view (`agree_on_schedule`), and checks the shape and dtype of every activation
it is about to send (`check_outgoing`).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from nanomt.config_rules import SCHEDULES
from nanomt.parallel.failures import note_operation

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Signatures every pipeline group has already agreed on (checked once, not every step).
_AGREED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def agree_on_schedule(grid, schedule: str, m: int, v: int, forward_only: bool,
                      shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device
                      ) -> None:
    """All-gather this rank's view of the schedule over the pipeline group; ValueError on every
    rank if they differ.

    Runs once per distinct view (then cached), on a tensor on `device`: an NCCL group has no
    CPU path. A disagreement is thus caught when the views first appear, at a run's first step.
    Being the first operation on pp_group, it also opens the NCCL communicator with every
    member, as torch requires before a batch_isend_irecv that not every member joins."""
    if grid.pp_group is None:
        return
    dtype_code = DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES)
    signature = {"schedule": SCHEDULES.index(schedule), "microbatches": m, "virtual_stages": v,
                 "forward_only": forward_only, "seq": shape[0], "batch": shape[1],
                 "hidden": shape[2], "dtype": dtype_code}
    keys = sorted(signature)
    key = tuple((k, int(signature[k])) for k in keys)
    agreed = _AGREED.setdefault(grid, set())
    if key in agreed:
        return
    mine = torch.tensor([value for _, value in key], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(grid.pp_size)]
    note_operation("all_gather (schedule check)", grid.pp_group)
    dist.all_gather(everyone, mine, group=grid.pp_group)
    if any(not torch.equal(other, mine) for other in everyone):
        table = "; ".join(f"pp rank {r}: " + ", ".join(f"{k}={int(v)}" for k, v in zip(keys, row))
                          for r, row in enumerate(everyone))
        raise ValueError(f"pipeline ranks disagree on the schedule and would deadlock: {table}")
    agreed.add(key)


def check_outgoing(tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                   pp_rank: int) -> None:
    """ValueError unless a stage output has the activation shape and dtype the receiver expects."""
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise ValueError(
            f"pipeline rank {pp_rank} would send a {tuple(tensor.shape)} {tensor.dtype} tensor "
            f"but its neighbours expect {shape} {dtype}: stage outputs must keep the activation "
            f"shape")
