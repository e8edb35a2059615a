"""Counting collectives for the tests: what kind, on which group, how many elements and bytes.

nanomt.parallel.comm issues every collective through a few torch.distributed entry points
(`dist.all_reduce`, `dist.broadcast` and the two single-tensor aliases `comm._all_gather_single`,
`comm._reduce_scatter_single`, each looked up when called), and the pipeline (and the
context-parallel ring) posts its messages with `dist.batch_isend_irecv`. Inside `traffic_log()`
or `count_collectives()` those entry points are wrapped so that each call is recorded before it
runs; the package itself counts nothing.

A record holds the elements of the FULL tensor: the input of a reduce-scatter, the output of an
all-gather, what this rank sends in an all-to-all; every isend of a batch is one record of kind "send". That is how the tests check the
papers' communication volume: two all-reduces of b*s*h per layer forward and two backward
(Shoeybi et al. 2019), ZeRO's 2 or 3 times the parameter count per step and rank (Rajbhandari et
al. 2020, `TrafficRecord.volume_bytes`), a pipeline stage's s*b*h/t per message and tp rank.
"""

from __future__ import annotations

import contextlib
import unittest.mock
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanomt.parallel import comm
from nanomt.parallel.failures import group_name

# ZeRO's accounting of the data one rank moves (Rajbhandari et al. 2019, section 7): a
# reduce-scatter or an all-gather of a Psi-element tensor moves Psi, an all-reduce (a
# reduce-scatter followed by an all-gather) 2 Psi. A ring sends (N-1)/N of that per rank.
VOLUME_FACTOR = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1, "send": 1,
                 "all_to_all": 1}

# The entry points comm calls -> (the kind recorded, the position of the full tensor).
COLLECTIVES = {(dist, "all_reduce"): ("all_reduce", 0),
               (dist, "broadcast"): ("broadcast", 0),
               (comm, "_all_gather_single"): ("all_gather", 0),  # (output, shard)
               (comm, "_reduce_scatter_single"): ("reduce_scatter", 1),  # (shard, input)
               (dist, "all_to_all_single"): ("all_to_all", 1)}  # (output, what I send)

Note = Callable[[str, torch.Tensor, comm.Group], None]  # (kind, full tensor, group) -> None


@dataclass(frozen=True)
class TrafficRecord:
    """One collective: its kind, the named group, the elements of the full tensor, their bytes."""

    kind: str
    group: str
    numel: int
    nbytes: int

    @property
    def volume_bytes(self) -> int:
        """Bytes moved per rank in ZeRO's accounting (VOLUME_FACTOR)."""
        return VOLUME_FACTOR[self.kind] * self.nbytes


@contextlib.contextmanager
def traffic_log() -> Iterator[list[TrafficRecord]]:
    """Record every collective and pipeline send issued inside the block as a TrafficRecord."""
    log: list[TrafficRecord] = []

    def note(kind: str, tensor: torch.Tensor, group: comm.Group) -> None:
        log.append(TrafficRecord(kind, group_name(group), tensor.numel(),
                                 tensor.numel() * tensor.element_size()))

    with _noting(note):
        yield log


@contextlib.contextmanager
def count_collectives() -> Iterator[list[tuple[str, int]]]:
    """Record every collective issued inside the block as (kind, numel of the full tensor);
    point-to-point sends are not collectives and are left out."""
    log: list[tuple[str, int]] = []

    def note(kind: str, tensor: torch.Tensor, group: comm.Group) -> None:
        if kind != "send":
            log.append((kind, tensor.numel()))

    with _noting(note):
        yield log


@contextlib.contextmanager
def _noting(note: Note) -> Iterator[None]:
    """Wrap comm's collectives and the batched point-to-point posting so each calls `note`."""
    with contextlib.ExitStack() as patches:
        for (owner, name), (kind, full_at) in COLLECTIVES.items():
            counted = _noted(getattr(owner, name), kind, full_at, note)
            patches.enter_context(unittest.mock.patch.object(owner, name, counted))
        counted_batch = _noted_sends(dist.batch_isend_irecv, note)
        patches.enter_context(unittest.mock.patch.object(dist, "batch_isend_irecv", counted_batch))
        yield


def _noted(collective: Callable, kind: str, full_at: int, note: Note) -> Callable:
    def call(*args, group: comm.Group = None, **kwargs):  # comm passes the group by keyword
        note(kind, args[full_at], group)
        return collective(*args, group=group, **kwargs)
    return call


def _noted_sends(batch_isend_irecv: Callable, note: Note) -> Callable:
    def call(ops: list[dist.P2POp]):
        for op in ops:
            if op.op is dist.isend:
                note("send", op.tensor, op.group)
        return batch_isend_irecv(ops)
    return call
