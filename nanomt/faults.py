"""Fault injection: make a chosen rank fail on purpose, so the failure paths can be tested.

Off unless the environment variable NANOMT_FAULT is set (read here and nowhere else), like
Megatron's fault injector. Its value is one or more faults separated by ";":

    NANOMT_FAULT="kill:rank=1,step=7"                 SIGKILL rank 1 as it starts step 7
    NANOMT_FAULT="stall:rank=2,step=5,at=optimizer"   rank 2 hangs before step 5's optimizer step
    NANOMT_FAULT="fail:rank=1,step=6,at=save"         rank 1's shard write of checkpoint 6 fails
    NANOMT_FAULT="kill:rank=3,at=start"               SIGKILL rank 3 once it has joined the world

    kind      kill (SIGKILL: no handler runs), stall (sleep forever), fail (raise: an OSError
              "no space left on device" at a save, a RuntimeError elsewhere)
    rank      global rank that fails (default 0)
    step      step number as logged, 1 for the first step (default 1)
    at        step (before the step's forward, default), optimizer (after its backward, before
              the gradient reduction and update), save (while writing that step's checkpoint),
              start (after joining the world, before the grid's groups exist; step is ignored)
    attempt   launch attempt it fires in (default 0: the first, so a restarted job recovers
              instead of failing again), as agreed by all ranks (nanomt.parallel.launch)
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from functools import lru_cache

from nanomt.parallel.launch import launch_attempt

POINTS = ("start", "step", "optimizer", "save")
KINDS = ("kill", "stall", "fail")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int = 0
    step: int = 1
    at: str = "step"
    attempt: int = 0


@lru_cache(maxsize=8)
def parse_faults(spec: str) -> tuple[Fault, ...]:
    """NANOMT_FAULT's value as Faults; ValueError naming the bad part."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, _, fields = part.partition(":")
        if kind not in KINDS:
            raise ValueError(f"NANOMT_FAULT: unknown kind {kind!r} in {part!r} (one of {KINDS})")
        values: dict[str, str | int] = {}
        for item in filter(None, fields.split(",")):
            key, _, value = item.partition("=")
            if key not in ("rank", "step", "at", "attempt"):
                raise ValueError(f"NANOMT_FAULT: unknown field {key!r} in {part!r}")
            values[key] = value if key == "at" else int(value)
        fault = Fault(kind, **values)
        if fault.at not in POINTS:
            raise ValueError(f"NANOMT_FAULT: at={fault.at!r} must be one of {POINTS}")
        faults.append(fault)
    return tuple(faults)


def inject(at: str, step: int = 0) -> None:
    """Fire any fault set for this rank at point `at` of step `step` (1-based; none at start)."""
    spec = os.environ.get("NANOMT_FAULT")
    if not spec:
        return
    rank = int(os.environ.get("RANK", "0"))
    for fault in parse_faults(spec):
        if ((fault.at, fault.rank, fault.attempt) == (at, rank, launch_attempt())
                and (at == "start" or fault.step == step)):
            _fire(fault)


def _fire(fault: Fault) -> None:
    when = "start-up" if fault.at == "start" else f"{fault.at} (step {fault.step})"
    print(f"nanomt: injected fault: {fault.kind} on rank {fault.rank} at {when}", flush=True)
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "stall":
        while True:
            time.sleep(3600)
    if fault.at == "save":
        raise OSError(errno.ENOSPC, "No space left on device (injected by NANOMT_FAULT)")
    raise RuntimeError(f"injected fault (NANOMT_FAULT) at {fault.at} of step {fault.step}")
