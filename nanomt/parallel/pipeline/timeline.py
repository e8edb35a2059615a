"""Each rank's record of its own pipeline work, for pictures of the schedule and its bubble.

When `train.timeline=true`, every rank notes the wall-clock start and end of each forward and
backward pass (micro-batch, chunk) and of each wait for a neighbour's message, step by step, and
writes them to `<run>/timeline/rank<N>.json`. tools/pipeline_timeline.py draws them.

The bubble is the time a rank is idle during a step. Narayanan et al. 2021 (section 2.2) give
it relative to the ideal compute time: (p-1)/m for GPipe and 1F1B, (p-1)/(v*m) interleaved.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nanomt.parallel.grid import ParallelGrid


class Timeline:
    """Events of one rank: (kind, micro-batch, chunk, start_s, end_s); kind F, B, W or wait.

    Only the last `keep_last` steps are held (a long run would otherwise grow without bound).
    On a GPU the passes are asynchronous, so each span records a pair of CUDA events instead of
    host clock reads, and a step's pairs are converted to seconds when the step ends (one
    synchronize per step, only while recording). `cuda_events` defaults to whether CUDA is in
    use when the first step begins (`torch.cuda.is_initialized()`: the model is on a GPU by
    then): a CPU run on a GPU host never touches CUDA."""

    def __init__(self, meta: dict | None = None, keep_last: int = 50,
                 cuda_events: bool | None = None):
        self.meta = dict(meta or {})
        self.keep_last = keep_last
        self.cuda_events = cuda_events  # None: decided at the first step
        self.steps: list[dict] = []
        self.events: list[list] = []
        self.pending: list[tuple[str, int, int, object, object]] = []  # CUDA event pairs
        self.anchor: tuple[object, float] | None = None  # (CUDA event, its host time)

    @classmethod
    def of_rank(cls, grid: ParallelGrid, virtual_stages: int, num_microbatches: int,
                device: torch.device, schedule: str = "1f1b") -> Timeline:
        """The timeline of this rank of `grid`, its coordinates and the schedule's shape in
        its metadata (what tools/pipeline_timeline.py draws and measures)."""
        return cls({"rank": grid.rank, "pp_rank": grid.pp_rank, "tp_rank": grid.tp_rank,
                    "dp_rank": grid.dp_rank, "pp": grid.pp_size,
                    "virtual_stages": virtual_stages, "num_microbatches": num_microbatches,
                    "schedule": schedule},
                   cuda_events=device.type == "cuda")

    def begin_step(self, step: int) -> None:
        self.end_step()
        self.events = []
        self.steps.append({"step": step, "events": self.events})
        del self.steps[:-self.keep_last]
        if self.cuda_events is None:
            self.cuda_events = torch.cuda.is_initialized()
        if self.cuda_events:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.anchor = (start, time.time())

    def end_step(self) -> None:
        """Turn the step's CUDA event pairs into seconds since the epoch (no-op on the CPU)."""
        if not self.pending:
            return
        anchor, anchor_s = self.anchor
        self.pending[-1][4].synchronize()
        for kind, microbatch, chunk, start, end in self.pending:
            self.events.append([kind, microbatch, chunk,
                                anchor_s + anchor.elapsed_time(start) / 1e3,
                                anchor_s + anchor.elapsed_time(end) / 1e3])
        self.pending = []

    @contextlib.contextmanager
    def span(self, kind: str, microbatch: int = -1, chunk: int = -1) -> Iterator[None]:
        if self.cuda_events and self.anchor is not None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.pending.append((kind, microbatch, chunk, start, end))
            return
        start_s = time.time()
        try:
            yield
        finally:
            self.events.append([kind, microbatch, chunk, start_s, time.time()])

    def save(self, path: Path) -> None:
        self.end_step()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.meta, "steps": self.steps}))


def maybe_span(timeline: Timeline | None, kind: str, microbatch: int = -1, chunk: int = -1
               ) -> contextlib.AbstractContextManager:
    """timeline.span(...) or a no-op when no timeline is being recorded."""
    if timeline is None:
        return contextlib.nullcontext()
    return timeline.span(kind, microbatch, chunk)


def load_timelines(folder: Path) -> list[dict]:
    """Every rank's timeline from a run's timeline/ folder, in rank order."""
    files = sorted(Path(folder).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    if not files:
        raise FileNotFoundError(f"no rank*.json in {folder}: run with train.timeline=true")
    return [json.loads(f.read_text()) for f in files]


def bubble_fraction(rank_events: list[list[list]]) -> tuple[float, float]:
    """(idle / busy, idle / span) averaged over ranks, for one step's events of every rank.

    The step spans from the first pass on any rank to the last; a rank is busy while it runs a
    forward, backward or (zero-bubble schedules) weight-gradient pass (waits count as idle).
    """
    passes = [[e for e in events if e[0] in ("F", "B", "W")] for events in rank_events]
    start = min(e[3] for events in passes for e in events)
    end = max(e[4] for events in passes for e in events)
    span = end - start
    idle_over_busy, idle_over_span = 0.0, 0.0
    for events in passes:
        busy = sum(e[4] - e[3] for e in events)
        idle_over_busy += (span - busy) / busy
        idle_over_span += (span - busy) / span
    return idle_over_busy / len(passes), idle_over_span / len(passes)
