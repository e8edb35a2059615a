"""Which messages a pipeline rank posts together (Megatron's posting), and the one simulator
that replays a schedule with them before it runs.

The rules, and why posting after every pass would hang interleaved 1F1B, are explained once in
docs/pipeline.md ("Messages"). `communication_plan` groups a rank's passes into slots (a forward
directly followed by a backward shares one) and posts one unit of `Transfer`s after each slot,
plus one before the first; `with_waits` marks, per unit, the last unit whose receives its passes
need (the engine waits for no more, so later units overlap its compute). `replay` runs every rank's units under both constraints a real run
meets, the data (a pass waits for its inputs) and a model of NCCL's matching (a posted batch
waits for its partners), and fails naming the stuck ranks instead of letting a job hang.
`checked_plans` builds and replays a schedule's plans once (cached); the engine and the start-up
check (`check_config`) both call it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from nanomt.parallel.pipeline.p2p import Transfer
from nanomt.parallel.pipeline.schedules import PipelineOp, schedule_orders, warmup_forwards

ACTIVATION, GRADIENT = 0, 1


def message_tag(kind: int, global_chunk: int, microbatch: int, num_microbatches: int) -> int:
    """A tag unique within one schedule: (chunk that receives it, micro-batch, kind)."""
    return (global_chunk * num_microbatches + microbatch) * 2 + kind


@dataclass(frozen=True)
class Unit:
    """Passes run back to back, then one batch of transfers posted together. Before the passes
    run, the rank waits for its units up to `wait_for` (the last one holding a receive they
    need; -1: none; None: the unit just before, the strictest choice)."""

    passes: tuple[PipelineOp, ...]
    transfers: tuple[Transfer, ...]
    wait_for: int | None = None


def slots(order: tuple[PipelineOp, ...], warmup: int) -> list[tuple[PipelineOp, ...]]:
    """Group an order into slots: after the `warmup` forwards, each forward directly followed by
    a backward (the steady state) shares one slot; every other pass has its own."""
    out: list[tuple[PipelineOp, ...]] = []
    index, forwards_seen = 0, 0
    while index < len(order):
        pair = order[index:index + 2]
        steady = pair[0].kind == "F" and forwards_seen >= warmup
        forwards_seen += pair[0].kind == "F"
        if steady and len(pair) == 2 and pair[1].kind == "B":
            out.append(tuple(pair))
            index += 2
        else:
            out.append((order[index],))
            index += 1
    return out


def send_of(op: PipelineOp, rank: int, pp: int, v: int, m: int) -> Transfer | None:
    """What pass `op` sends: its output to the next chunk, or its input gradient to the previous."""
    k = op.chunk * pp + rank
    if op.kind == "F" and k < pp * v - 1:
        return Transfer(True, op, (rank + 1) % pp, message_tag(ACTIVATION, k + 1, op.microbatch, m))
    if op.kind == "B" and k > 0:
        return Transfer(True, op, (rank - 1) % pp, message_tag(GRADIENT, k - 1, op.microbatch, m))
    return None


def receive_of(op: PipelineOp, rank: int, pp: int, v: int, m: int) -> Transfer | None:
    """What pass `op` receives: its input activation, or its output's gradient."""
    k = op.chunk * pp + rank
    if op.kind == "F" and k > 0:
        return Transfer(False, op, (rank - 1) % pp, message_tag(ACTIVATION, k, op.microbatch, m))
    if op.kind == "B" and k < pp * v - 1:
        return Transfer(False, op, (rank + 1) % pp, message_tag(GRADIENT, k, op.microbatch, m))
    return None


def communication_plan(order: tuple[PipelineOp, ...], warmup: int, rank: int, pp: int, v: int,
                       m: int) -> list[Unit]:
    """The units rank `rank` posts: first the receives of slot 0, then after each slot its
    sends and the next slot's receives."""
    grouped = slots(order, warmup)
    plan = []
    for index in range(len(grouped) + 1):
        passes = grouped[index - 1] if index > 0 else ()
        upcoming = grouped[index] if index < len(grouped) else ()
        sends = [send_of(op, rank, pp, v, m) for op in passes]
        receives = [receive_of(op, rank, pp, v, m) for op in upcoming]
        transfers = tuple(t for t in sends + receives if t is not None)
        plan.append(Unit(passes, transfers))
    return with_waits(plan)


def with_waits(plan: Sequence[Unit]) -> list[Unit]:
    """Each unit waits only for the last earlier unit that receives one of its passes' inputs:
    the units posted after it stay in flight while the passes compute (the overlap)."""
    holder = {t.op: u for u, unit in enumerate(plan) for t in unit.transfers if not t.is_send}
    return [Unit(unit.passes, unit.transfers,
                 max((holder[op] for op in unit.passes if op in holder), default=-1))
            for unit in plan]


def match_transfers(plans: Sequence[Sequence[Unit]]) -> dict[tuple[int, int], list]:
    """Pair every send with its receive, in posting order per (sender, receiver), as NCCL does;
    ValueError if the tags of a pair's sends and receives differ (matched out of order) or a
    rank receives what nobody sends. Returns, for each (rank, unit), the partners' (rank, unit)."""
    queues: dict[tuple[int, int, bool], list[tuple[int, int]]] = {}  # (src, dst, send) -> units
    tags: dict[tuple[int, int, bool], list[int]] = {}
    for rank, plan in enumerate(plans):
        for u, unit in enumerate(plan):
            for t in unit.transfers:
                key = (rank, t.peer, True) if t.is_send else (t.peer, rank, False)
                queues.setdefault(key, []).append((rank, u))
                tags.setdefault(key, []).append(t.tag)
    partners: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (src, dst, is_send), sent_tags in tags.items():
        if not is_send:
            if (src, dst, True) not in tags:
                raise ValueError(f"rank {dst} would wait for messages {sent_tags} from rank "
                                 f"{src} that it never sends")
            continue
        received_tags = tags.get((src, dst, False), [])
        if sent_tags != received_tags:
            raise ValueError(f"pipeline messages from rank {src} to rank {dst} would be matched "
                             f"out of order: sends {sent_tags} vs receives {received_tags}")
        for a, b in zip(queues[(src, dst, True)], queues[(src, dst, False)]):
            partners.setdefault(a, []).append(b)
            partners.setdefault(b, []).append(a)
    return partners


def replay(plans: Sequence[Sequence[Unit]], virtual_stages: int) -> None:
    """The schedule simulator: run every rank's units as the engine does; ValueError naming the
    stuck ranks if some would wait forever (in the data or in NCCL's matching of messages).

    A rank runs unit u's passes once its units up to u.wait_for are complete, in order, each
    once its inputs exist: F(i, k) after F(i, k-1), B(i, k) after F(i, k) and B(i, k+1), with
    global chunk k = chunk * pp + rank. Then it posts u's transfers. Its posted units complete
    in order (rule 3): the first incomplete one completes once every transfer's partner
    (match_transfers) sits in a posted unit that is its own rank's first incomplete one (or
    already complete), since a batch queued behind another does not start before it ends.
    """
    pp = len(plans)
    last = pp * virtual_stages - 1
    partners = match_transfers(plans)
    done: set[tuple[str, int, int]] = set()
    posted, completed = [0] * pp, [0] * pp

    def ready(rank: int, op: PipelineOp) -> bool:
        k = op.chunk * pp + rank
        if op.kind == "F":
            return k == 0 or ("F", op.microbatch, k - 1) in done
        return ("F", op.microbatch, k) in done and (k == last or ("B", op.microbatch, k + 1)
                                                    in done)

    def active(peer: int, unit: int) -> bool:
        return posted[peer] > unit and completed[peer] >= unit

    progressed = True
    while progressed:
        progressed = False
        for rank, plan in enumerate(plans):
            u = posted[rank]
            if u < len(plan) and completed[rank] > waits_for(plan, u):
                for op in plan[u].passes:  # run the passes (all ready, in order), then post
                    if not ready(rank, op):
                        break
                    done.add((op.kind, op.microbatch, op.chunk * pp + rank))
                else:
                    posted[rank] = u + 1
                    progressed = True
            head = completed[rank]
            if posted[rank] > head and all(active(peer, pu)
                                           for peer, pu in partners.get((rank, head), [])):
                completed[rank] += 1
                progressed = True
    stuck = [r for r in range(pp) if completed[r] < len(plans[r])]
    if stuck:
        raise ValueError("pipeline schedule would deadlock: " + ", ".join(
            stuck_at(plans[r], r, posted[r], completed[r], done, pp) for r in stuck))


def waits_for(plan: Sequence[Unit], u: int) -> int:
    """The last unit that must complete before unit u's passes run."""
    return u - 1 if plan[u].wait_for is None else plan[u].wait_for


def stuck_at(plan: Sequence[Unit], rank: int, posted: int, completed: int, done: set,
             pp: int) -> str:
    """Where a stuck rank waits: its first incomplete unit's messages, or a pass whose inputs
    never come."""
    if posted > completed:
        passes = "+".join(map(str, plan[completed].passes)) or "start"
        return f"rank {rank} in the messages posted after {passes} (NCCL would never match them)"
    waiting = next(op for op in plan[posted].passes
                   if (op.kind, op.microbatch, op.chunk * pp + rank) not in done)
    return f"rank {rank} at {waiting} (its inputs never arrive)"


@functools.lru_cache(maxsize=64)
def checked_plans(schedule: str, pp: int, m: int, v: int,
                  forward_only: bool) -> tuple[tuple[Unit, ...], ...]:
    """Every rank's units for a schedule, replayed once (cached) before they run."""
    orders = schedule_orders(schedule, pp, m, v, forward_only)
    plans = [communication_plan(order, unpaired_forwards(schedule, pp, rank, m, v, forward_only),
                                rank, pp, v, m)
             for rank, order in enumerate(orders)]
    replay(plans, v)
    return tuple(tuple(plan) for plan in plans)


def unpaired_forwards(schedule: str, pp: int, rank: int, m: int, v: int,
                      forward_only: bool) -> int:
    """Forwards that run in slots of their own before F/B pairs share one (`slots`).

    Interleaved 1F1B pairs its steady-state passes, as Megatron does (posting after every pass
    can deadlock it: docs/pipeline.md). With one chunk per rank no pass is paired (Megatron's
    send_forward_recv_backward / send_backward_recv_forward): a forward would otherwise wait
    for the gradient of the backward that follows it, and the two stages would take turns
    instead of working at once."""
    if v == 1:
        return m
    return warmup_forwards(schedule, pp, rank, m, v, forward_only)
