"""Which messages a pipeline rank posts together (Megatron's posting), and a replay of them under
a model of NCCL's rules.

The rules, and why posting after every pass would hang interleaved 1F1B, are explained once in
docs/pipeline.md ("Messages"). `communication_plan` groups a rank's passes into slots (a forward
directly followed by a backward shares one) and posts one unit of `Transfer`s after each slot,
plus one before the first; `check_posting` replays every rank's units and fails with the stuck
ranks instead of letting a job hang. `checked_plans` runs both once per schedule (cached).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from nanomt.parallel.pipeline.p2p import Transfer
from nanomt.parallel.pipeline.schedules import PipelineOp, checked_schedule, warmup_forwards

ACTIVATION, GRADIENT = 0, 1


def message_tag(kind: int, global_chunk: int, microbatch: int, num_microbatches: int) -> int:
    """A tag unique within one schedule: (chunk that receives it, micro-batch, kind)."""
    return (global_chunk * num_microbatches + microbatch) * 2 + kind


@dataclass(frozen=True)
class Unit:
    """Passes run back to back, then one batch of transfers posted together."""

    passes: tuple[PipelineOp, ...]
    transfers: tuple[Transfer, ...]


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
    return plan


def check_posting(plans: list[list[Unit]]) -> None:
    """Replay every rank's units under NCCL's rules; ValueError if messages would be matched out
    of order or some ranks would wait forever.

    Unit u of rank r is posted once r's unit u-1 has completed (its passes need those receives);
    it completes once every transfer's partner, matched in posting order per (sender, receiver),
    sits in a unit that has been posted, and all of r's earlier units have completed.
    """
    pp = len(plans)
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
            continue
        received_tags = tags.get((src, dst, False), [])
        if sent_tags != received_tags:
            raise ValueError(f"pipeline messages from rank {src} to rank {dst} would be matched "
                             f"out of order: sends {sent_tags} vs receives {received_tags}")
        for a, b in zip(queues[(src, dst, True)], queues[(src, dst, False)]):
            partners.setdefault(a, []).append(b)
            partners.setdefault(b, []).append(a)
    for (src, dst, is_send), received_tags in tags.items():
        if not is_send and (src, dst, True) not in tags:
            raise ValueError(f"rank {dst} would wait for messages {received_tags} from rank {src} "
                             f"that it never sends")
    completed = [0] * pp  # units completed per rank; unit completed[r] is the posted one
    progressed = True
    while progressed:
        progressed = False
        for rank in range(pp):
            u = completed[rank]
            if u < len(plans[rank]) and all(completed[peer] >= pu
                                            for peer, pu in partners.get((rank, u), [])):
                completed[rank] += 1
                progressed = True
    stuck = [r for r in range(pp) if completed[r] < len(plans[r])]
    if stuck:
        where = ", ".join(f"rank {r} in the unit after "
                          f"{'+'.join(map(str, plans[r][completed[r]].passes)) or 'start'}"
                          for r in stuck)
        raise ValueError(f"pipeline messages would deadlock on NCCL: {where}")


@functools.lru_cache(maxsize=64)
def checked_plans(schedule: str, pp: int, m: int, v: int,
                  forward_only: bool) -> tuple[tuple[Unit, ...], ...]:
    """Every rank's units for a schedule, checked for data dependencies and NCCL posting."""
    orders = checked_schedule(schedule, pp, m, v, forward_only)
    plans = [communication_plan(order, warmup_forwards(schedule, pp, rank, m, v, forward_only),
                                rank, pp, v, m)
             for rank, order in enumerate(orders)]
    check_posting(plans)
    return tuple(tuple(plan) for plan in plans)
