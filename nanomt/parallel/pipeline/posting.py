"""Which messages a pipeline rank posts together, on which of its two queues, and the one
simulator that replays a schedule with them before it runs.

NCCL's rules, and why receiving ahead needs two queues, are explained once in docs/pipeline.md
("Messages"). Activations going forward travel on one queue (the grid's `pp_group`), gradients
going backward on the other (`pp_grad_group`): two NCCL communicators, two streams.
`communication_plan` posts, before the first pass and after each pass, one `Unit` (batch) per
queue: the pass's send and the receives due then. A receive goes out two passes before its pass
(`receive_points`), so it arrives while the pass before computes (Megatron's overlap_p2p_comm);
interleaved, no earlier than the previous pass of its kind. `with_waits` marks what each pass
waits for: the units holding its receives (the rest stays in flight while it computes) and, for
a backward, activation units already settled, so sent outputs are freed in time. `replay` runs
every rank's units under both constraints a real run meets, the data (a pass waits for its
inputs) and a model of NCCL's matching (a posted batch waits for its partners; one in-order
queue per rank and direction), and fails naming the stuck ranks instead of letting a job hang.
`checked_plans` builds and replays a schedule's plans once (cached); the engine and the start-up
check (`check_config`) both call it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from nanomt.parallel.pipeline.p2p import Transfer
from nanomt.parallel.pipeline.schedules import PipelineOp, schedule_orders

ACTIVATION, GRADIENT = 0, 1  # what a message carries, and the queue it travels on
QUEUES = ("activation", "gradient")


def message_tag(kind: int, global_chunk: int, microbatch: int, num_microbatches: int) -> int:
    """A tag unique within one schedule: (chunk that receives it, micro-batch, kind)."""
    return (global_chunk * num_microbatches + microbatch) * 2 + kind


def queue_of(transfer: Transfer) -> int:
    """Activations (a forward's output, sent on) go on one queue, gradients on the other."""
    return ACTIVATION if transfer.op.kind == "F" else GRADIENT


@dataclass(frozen=True)
class Unit:
    """Passes run back to back, then one batch of transfers posted together on `queue`. Before
    the passes run, the rank waits for the units in `wait_for`, at most one per queue (a unit
    done means every earlier unit of its queue is done; None: every earlier unit, the strictest
    choice)."""

    passes: tuple[PipelineOp, ...]
    transfers: tuple[Transfer, ...]
    queue: int = ACTIVATION
    wait_for: tuple[int, ...] | None = None


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


def receive_points(order: Sequence[PipelineOp], v: int) -> list[int]:
    """After which pass (-1: before the first) each pass's receive is posted: two passes before
    it, so it arrives while the pass before it computes. With v > 1 no earlier than the previous
    pass of its kind: on a queue, a receive must not go ahead of the send before it, or the
    chunks' ring (the last rank feeds the first) closes a cycle (docs/pipeline.md)."""
    points = []
    for x, op in enumerate(order):
        point = x - 2
        if v > 1:
            point = max(point, max((y for y in range(x) if order[y].kind == op.kind), default=-1))
        points.append(max(point, -1))
    return points


def communication_plan(order: Sequence[PipelineOp], rank: int, pp: int, v: int, m: int,
                       points: Sequence[int] | None = None) -> list[Unit]:
    """The units rank `rank` posts: before the first pass, and after each pass, its send and
    the receives due then (`receive_points`, or `points` given), one unit per queue."""
    points = receive_points(order, v) if points is None else points
    plan = []
    for index in range(len(order) + 1):
        passes = (order[index - 1],) if index > 0 else ()
        sends = [send_of(op, rank, pp, v, m) for op in passes]
        receives = [receive_of(op, rank, pp, v, m)
                    for op, point in zip(order, points) if point == index - 1]
        transfers = [t for t in sends + receives if t is not None]
        for queue in (ACTIVATION, GRADIENT):  # the pass rides with the first unit
            batch = tuple(t for t in transfers if queue_of(t) == queue)
            if batch or queue == ACTIVATION:
                plan.append(Unit(passes if queue == ACTIVATION else (), batch, queue))
    return with_waits(plan)


def with_waits(plan: Sequence[Unit]) -> list[Unit]:
    """Each unit waits only for, per queue, the last earlier unit that receives one of its
    passes' inputs: the units posted after those stay in flight while the passes compute.

    A backward also waits for the activation units already settled (`settled_sends`), so the
    outputs they sent are freed by their micro-batch's backward at the latest: the forwards'
    sends otherwise sit on a queue nobody waits for (the first stage receives no activations)."""
    holder = {t.op: u for u, unit in enumerate(plan) for t in unit.transfers if not t.is_send}
    settled, waited, seen, out = -1, -1, set(), []  # waited: the last activation unit so far
    for index, unit in enumerate(plan):
        last: dict[int, int] = {}  # per queue, the latest unit to wait for
        for u in sorted(holder[op] for op in unit.passes if op in holder):
            last[plan[u].queue] = u
        if any(op.kind == "B" for op in unit.passes):
            settled = settled_sends(plan, settled, index, seen | set(unit.passes))
            if settled > max(waited, last.get(ACTIVATION, -1)):
                last[ACTIVATION] = settled
        waited = max(waited, last.get(ACTIVATION, -1))
        seen.update(unit.passes)
        out.append(Unit(unit.passes, unit.transfers, unit.queue, tuple(sorted(last.values()))))
    return out


def settled_sends(plan: Sequence[Unit], settled: int, before: int, ran: set[PipelineOp]) -> int:
    """The last activation unit before unit `before` (from `settled` on) whose wait costs
    nothing once the passes in `ran` have run: it and every activation unit before it receive
    only inputs of passes in `ran` and send only outputs whose backward is in `ran` (that
    gradient came back, so the neighbour has the output)."""
    def done(t: Transfer) -> bool:
        return (PipelineOp("B", t.op.microbatch, t.op.chunk) if t.is_send else t.op) in ran

    for u in range(settled + 1, before):
        if plan[u].queue == ACTIVATION and plan[u].transfers:
            if not all(done(t) for t in plan[u].transfers):
                break
            settled = u
    return settled


def match_transfers(plans: Sequence[Sequence[Unit]]) -> dict[tuple[int, int], list]:
    """Pair every send with its receive, in posting order per (sender, receiver, queue), as NCCL
    does on each communicator; ValueError if the tags of a pair's sends and receives differ
    (matched out of order) or a rank receives what nobody sends. Returns, for each (rank, unit),
    the partners' (rank, unit)."""
    units: dict[tuple[int, int, int, bool], list[tuple[int, int]]] = {}  # (src, dst, q, send)
    tags: dict[tuple[int, int, int, bool], list[int]] = {}
    for rank, plan in enumerate(plans):
        for u, unit in enumerate(plan):
            for t in unit.transfers:
                src, dst = (rank, t.peer) if t.is_send else (t.peer, rank)
                key = (src, dst, unit.queue, t.is_send)
                units.setdefault(key, []).append((rank, u))
                tags.setdefault(key, []).append(t.tag)
    partners: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (src, dst, queue, is_send), sent_tags in tags.items():
        where = f"from rank {src} to rank {dst} on the {QUEUES[queue]} queue"
        if not is_send:
            if (src, dst, queue, True) not in tags:
                raise ValueError(f"rank {dst} would wait for messages {sent_tags} {where}, "
                                 f"which rank {src} never sends")
            continue
        received_tags = tags.get((src, dst, queue, False), [])
        if sent_tags != received_tags:
            raise ValueError(f"pipeline messages {where} would be matched out of order: sends "
                             f"{sent_tags} vs receives {received_tags}")
        for a, b in zip(units[(src, dst, queue, True)], units[(src, dst, queue, False)]):
            partners.setdefault(a, []).append(b)
            partners.setdefault(b, []).append(a)
    return partners


def replay(plans: Sequence[Sequence[Unit]], virtual_stages: int) -> None:
    """The schedule simulator: run every rank's units as the engine does; ValueError naming the
    stuck ranks if some would wait forever (in the data or in NCCL's matching of messages).

    A rank runs unit u's passes once the units in u.wait_for are complete, in order, each once
    its inputs exist: F(i, k) after F(i, k-1), B(i, k) after F(i, k) and B(i, k+1), with global
    chunk k = chunk * pp + rank. Then it posts u's transfers. The posted units of each (rank,
    queue) complete in order (rule 3): the first incomplete one completes once every transfer's
    partner (match_transfers) sits in a posted unit that is the first incomplete one of its own
    rank's queue (or already complete), since a batch queued behind another does not start
    before it ends. The two queues of a rank progress independently.
    """
    pp = len(plans)
    last = pp * virtual_stages - 1
    partners = match_transfers(plans)
    done: set[tuple[str, int, int]] = set()
    posted = [0] * pp
    queues = [[[u for u, unit in enumerate(plan) if unit.queue == q] for q in range(len(QUEUES))]
              for plan in plans]  # each rank's units, per queue, in posting order
    heads = [[0] * len(QUEUES) for _ in plans]  # per (rank, queue): units completed

    def complete(rank: int, u: int) -> bool:
        return queues[rank][plans[rank][u].queue].index(u) < heads[rank][plans[rank][u].queue]

    def active(peer: int, u: int) -> bool:
        queue = plans[peer][u].queue
        return posted[peer] > u and queues[peer][queue].index(u) <= heads[peer][queue]

    def ready(rank: int, op: PipelineOp) -> bool:
        k = op.chunk * pp + rank
        if op.kind == "F":
            return k == 0 or ("F", op.microbatch, k - 1) in done
        return ("F", op.microbatch, k) in done and (k == last or ("B", op.microbatch, k + 1)
                                                    in done)

    progressed = True
    while progressed:
        progressed = False
        for rank, plan in enumerate(plans):
            u = posted[rank]
            if u < len(plan) and all(complete(rank, w) for w in waits_for(plan, u)):
                for op in plan[u].passes:  # run the passes (all ready, in order), then post
                    if not ready(rank, op):
                        break
                    done.add((op.kind, op.microbatch, op.chunk * pp + rank))
                else:
                    posted[rank] = u + 1
                    progressed = True
            for queue, order in enumerate(queues[rank]):
                head = heads[rank][queue]
                if head < len(order) and posted[rank] > order[head] and all(
                        active(peer, pu) for peer, pu in partners.get((rank, order[head]), [])):
                    heads[rank][queue] += 1
                    progressed = True
    stuck = [r for r in range(pp) if posted[r] < len(plans[r])
             or any(heads[r][q] < len(queues[r][q]) for q in range(len(QUEUES)))]
    if stuck:
        raise ValueError("pipeline schedule would deadlock: " + ", ".join(
            stuck_at(plans[r], r, posted[r], queues[r], heads[r], done, pp) for r in stuck))


def waits_for(plan: Sequence[Unit], u: int) -> tuple[int, ...]:
    """The units that must complete before unit u's passes run."""
    return tuple(range(u)) if plan[u].wait_for is None else plan[u].wait_for


def stuck_at(plan: Sequence[Unit], rank: int, posted: int, queues: list[list[int]],
             heads: list[int], done: set, pp: int) -> str:
    """Where a stuck rank waits: a queue's first incomplete unit, or a pass whose inputs never
    come."""
    for queue, order in enumerate(queues):
        if heads[queue] < len(order) and order[heads[queue]] < posted:
            u = order[heads[queue]]
            after = next((plan[w].passes for w in range(u, -1, -1) if plan[w].passes), ())
            return (f"rank {rank} in the {QUEUES[queue]} messages posted after "
                    f"{'+'.join(map(str, after)) or 'start'} (NCCL would never match them)")
    waiting = next(op for op in plan[posted].passes
                   if (op.kind, op.microbatch, op.chunk * pp + rank) not in done)
    return f"rank {rank} at {waiting} (its inputs never arrive)"


@functools.lru_cache(maxsize=64)
def checked_plans(schedule: str, pp: int, m: int, v: int,
                  forward_only: bool) -> tuple[tuple[Unit, ...], ...]:
    """Every rank's units for a schedule, replayed once (cached) before they run."""
    orders = schedule_orders(schedule, pp, m, v, forward_only)
    plans = [communication_plan(order, rank, pp, v, m) for rank, order in enumerate(orders)]
    replay(plans, v)
    return tuple(tuple(plan) for plan in plans)
