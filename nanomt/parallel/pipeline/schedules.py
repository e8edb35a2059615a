"""Pipeline schedules: the order in which each rank runs its forward and backward passes.

A schedule is nothing but, for every pipeline rank, the order of the forward (F) and backward
(B) pass of each micro-batch through each of its model chunks, in three phases: warm-up
(forwards only), steady state (one forward, one backward), cool-down (the backwards left).
The engine (engine.py) runs any such order; the three of Narayanan et al. 2021 differ only in
how many forwards the warm-up holds:

  GPipe (Huang et al. 2019)   all m forwards, then all m backwards: bubble (p-1)/m, but a rank
                              holds all m micro-batches' activations.
  1F1B (PipeDream-Flush)      rank r warms up with p-r-1 forwards: the same bubble (p-1)/m with
                              at most p-r micro-batches in flight (section 2.2.1).
  interleaved 1F1B            each rank holds v chunks (chunk k of the model on rank k mod p);
                              micro-batches go through in groups of p, chunk after chunk, and the
                              warm-up holds 2(p-r-1) + (v-1)p forwards: bubble (p-1)/(v*m)
                              (section 2.2.2). Config validation guarantees m % p == 0.

A rank exchanges messages with its neighbours between *slots* of passes (posting.py): every pass
is a slot, except that interleaved 1F1B's steady state exchanges once per forward-backward pair,
as Megatron does; its longer warm-up is what lets each pair's inputs arrive before the pair.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineOp:
    """One pass on one rank: kind "F" or "B", of `microbatch`, through local model `chunk`."""

    kind: str
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def passes(kind: str, pp: int, m: int, v: int) -> list[PipelineOp]:
    """A rank's forwards (or backwards) in the order it runs them: the micro-batches in groups
    of p, each group through chunk 0, 1, ..., v-1 (backwards: v-1 down to 0). With v = 1 that
    is simply micro-batch 0, 1, ..., m-1."""
    chunks = list(range(v)) if kind == "F" else list(reversed(range(v)))
    return [PipelineOp(kind, microbatch, chunk)
            for group in range(0, m, pp) for chunk in chunks
            for microbatch in range(group, min(group + pp, m))]


def warmup_forwards(schedule: str, pp: int, rank: int, m: int, v: int) -> int:
    """Forwards before rank `rank`'s first backward: enough for that backward's gradient to
    have come back from the last stage (GPipe: all of them)."""
    if schedule == "gpipe":
        return m * v
    if v == 1:
        return min(pp - rank - 1, m)
    return min(2 * (pp - rank - 1) + (v - 1) * pp, m * v)


def schedule_slots(schedule: str, pp: int, rank: int, m: int, v: int = 1,
                   forward_only: bool = False) -> list[tuple[PipelineOp, ...]]:
    """Rank `rank`'s passes, slot by slot: warm-up, steady state, cool-down.
    forward_only (evaluation) keeps the forwards, one slot each."""
    forwards, backwards = passes("F", pp, m, v), passes("B", pp, m, v)
    if forward_only:
        return [(op,) for op in forwards]
    warmup = warmup_forwards(schedule, pp, rank, m, v)
    slots = [(op,) for op in forwards[:warmup]]                    # warm-up: forwards only
    for forward, backward in zip(forwards[warmup:], backwards):    # steady state: 1F1B
        slots += [(forward,), (backward,)] if v == 1 else [(forward, backward)]
    slots += [(op,) for op in backwards[len(backwards) - warmup:]]  # cool-down: backwards left
    return slots


def schedule_order(schedule: str, pp: int, rank: int, m: int, v: int = 1,
                   forward_only: bool = False) -> list[PipelineOp]:
    """The order of passes of pipeline rank `rank`."""
    return [op for slot in schedule_slots(schedule, pp, rank, m, v, forward_only)
            for op in slot]
