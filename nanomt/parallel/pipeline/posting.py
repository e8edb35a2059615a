"""Which messages a pipeline rank posts together, and the simulator that checks them first.

All pipeline messages travel on one communicator, the grid's pp_group. Between two slots of
passes (schedules.py) a rank posts one batch, `batch_isend_irecv`: the sends of the slot before
and the receives of the slot after; it waits for the whole batch, then runs the slot. NCCL's
ordering rule for that communicator (docs/pipeline.md, "Messages"): the k-th batch rank i posts
with rank j must hold exactly the counterparts of the k-th batch j posts with i. So messages
with one neighbour share a batch only if the neighbour also posts their counterparts together;
otherwise they are split, in the neighbour's order (`split_in_peer_order`).

`replay` checks a plan before it runs: the ordering rule batch by batch (`match_batches`), then
every rank's batches and passes as the engine runs them, a batch completing once every partner
batch is posted and a pass running once its inputs exist. A plan that breaks the rule or would
hang fails with one line naming the ranks. `checked_plans` builds and replays a schedule's plans
once (cached); the engine and the start-up check (forward_backward.check_schedule_plans)
both call it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from nanomt.parallel.pipeline.partition import global_chunk_index, rank_of_chunk
from nanomt.parallel.pipeline.schedules import PipelineOp
from nanomt.parallel.pipeline.zero_bubble import V_SHAPED, pipeline_slots


@dataclass(frozen=True)
class Transfer:
    """One send or receive: of the pass `op` (its output or input gradient sent, its input or
    output gradient received), with pipeline rank `peer`, under `tag`."""

    is_send: bool
    op: PipelineOp
    peer: int
    tag: int

    def __str__(self) -> str:
        return f"{'send' if self.is_send else 'recv'} {self.op}"


@dataclass(frozen=True)
class Exchange:
    """One batch of transfers, posted together and waited for, then the passes of a slot."""

    transfers: tuple[Transfer, ...]
    passes: tuple[PipelineOp, ...] = ()


def message_tag(is_gradient: bool, global_chunk: int, microbatch: int, m: int) -> int:
    """A tag unique within one schedule: (chunk that receives it, micro-batch, kind). NCCL
    ignores tags; gloo matches by them, and so does the replay's check."""
    return (global_chunk * m + microbatch) * 2 + is_gradient


def send_of(op: PipelineOp, rank: int, pp: int, v: int, m: int,
            v_shape: bool = False) -> Transfer | None:
    """What pass `op` sends: its output to the next chunk, or its input gradient to the
    previous; nothing from a W, or where that chunk is on this rank (the turn of ZB-V's V)."""
    k = global_chunk_index(op.chunk, rank, pp, v_shape)
    to = k + 1 if op.kind == "F" else k - 1
    if op.kind == "W" or not 0 <= to < pp * v or rank_of_chunk(to, pp, v_shape) == rank:
        return None
    return Transfer(True, op, rank_of_chunk(to, pp, v_shape),
                    message_tag(op.kind == "B", to, op.microbatch, m))


def receive_of(op: PipelineOp, rank: int, pp: int, v: int, m: int,
               v_shape: bool = False) -> Transfer | None:
    """What pass `op` receives: its input activation, or its output's gradient (as send_of)."""
    k = global_chunk_index(op.chunk, rank, pp, v_shape)
    source = k - 1 if op.kind == "F" else k + 1
    if op.kind == "W" or not 0 <= source < pp * v or rank_of_chunk(source, pp, v_shape) == rank:
        return None
    return Transfer(False, op, rank_of_chunk(source, pp, v_shape),
                    message_tag(op.kind == "B", k, op.microbatch, m))


def slot_exchanges(slots: Sequence[Sequence[PipelineOp]], rank: int, pp: int, v: int,
                   m: int, v_shape: bool = False) -> list[Exchange]:
    """Before each slot, the sends of the slot before and the slot's receives; after the last
    slot, its sends."""
    plan, before = [], ()
    for slot in [*slots, ()]:
        transfers = [send_of(op, rank, pp, v, m, v_shape) for op in before]
        transfers += [receive_of(op, rank, pp, v, m, v_shape) for op in slot]
        transfers = [t for t in transfers if t is not None]
        if transfers or slot:
            plan.append(Exchange(tuple(transfers), tuple(slot)))
        before = slot
    return plan


def split_in_peer_order(exchange: Exchange, counterpart: dict[Transfer, int]
                        ) -> list[Exchange]:
    """The exchange as one batch, or, where its messages with one peer have their counterparts
    in different batches of that peer (`counterpart`: the index there), one batch per such
    batch of the peer, in the peer's order; the passes run after the last."""
    transfers = exchange.transfers
    split = {t.peer for t in transfers
             if len({counterpart[u] for u in transfers if u.peer == t.peer}) > 1}
    if not split:
        return [exchange]
    points = sorted({counterpart[t] for t in transfers if t.peer in split})
    batches = [tuple(t for t in transfers
                     if (counterpart[t] if t.peer in split else points[0]) == point)
               for point in points]
    return [Exchange(batch) for batch in batches[:-1]] + [Exchange(batches[-1], exchange.passes)]


def plans_from_slots(slots: Sequence[Sequence[Sequence[PipelineOp]]], v: int, m: int,
                     v_shape: bool = False) -> list[list[Exchange]]:
    """Every rank's batches and passes, given every rank's slots."""
    pp = len(slots)
    exchanges = [slot_exchanges(rank_slots, rank, pp, v, m, v_shape) for rank, rank_slots in
                 enumerate(slots)]
    posted_at = {(rank, t.is_send, t.tag): index for rank, plan in enumerate(exchanges)
                 for index, exchange in enumerate(plan) for t in exchange.transfers}
    return [[batch for exchange in plan for batch in split_in_peer_order(
                exchange, {t: posted_at.get((t.peer, not t.is_send, t.tag), -1)
                           for t in exchange.transfers})]
            for plan in exchanges]


def lockstep_plans(slots: Sequence[Sequence[Sequence[PipelineOp]]], v: int, m: int,
                   v_shape: bool = False) -> list[list[Exchange]]:
    """Every rank's batches and passes when slot t of every rank is one time step (ZB-V's,
    zero_bubble.zbv_steps; () an idle step): each message is sent and received in the batch
    at the end of the step that produced it, both sides in the same order, however many steps
    later the pass that takes it runs (ZeroBubbleVStep waits for the batch only before it)."""
    pp, num_steps = len(slots), len(slots[0])
    taker = {t.tag: (rank, t) for rank, rank_slots in enumerate(slots) for slot in rank_slots
             for t in (receive_of(op, rank, pp, v, m, v_shape) for op in slot) if t is not None}
    batches: list[list[list[Transfer]]] = [[[] for _ in range(num_steps + 1)] for _ in slots]
    for rank, rank_slots in enumerate(slots):
        for step, slot in enumerate(rank_slots):
            for send in filter(None, (send_of(op, rank, pp, v, m, v_shape) for op in slot)):
                peer, receive = taker[send.tag]
                batches[rank][step + 1].append(send)
                batches[peer][step + 1].append(receive)
    plans: list[list[Exchange]] = [[] for _ in slots]
    for rank, plan in enumerate(plans):
        for step, transfers in enumerate(batches[rank]):
            passes = tuple(slots[rank][step]) if step < num_steps else ()
            if transfers or not plan:
                plan.append(Exchange(tuple(transfers), passes))
            elif passes:  # nothing to post: the pass runs right after the ones before
                plan[-1] = Exchange(plan[-1].transfers, plan[-1].passes + passes)
    return plans


def match_batches(plans: Sequence[Sequence[Exchange]]) -> dict[tuple[int, int], list]:
    """NCCL's ordering rule on the one communicator: the k-th batch rank i posts with rank j
    holds exactly the counterparts (same tags, send for receive) of the k-th batch j posts with
    i. ValueError naming the first pair of batches that differ. Returns, for each (rank, batch),
    its partner batches (peer, batch)."""
    with_peer: dict[tuple[int, int], list[tuple[int, list[Transfer]]]] = {}
    for rank, plan in enumerate(plans):
        for u, exchange in enumerate(plan):
            for peer in sorted({t.peer for t in exchange.transfers}):
                batch = [t for t in exchange.transfers if t.peer == peer]
                with_peer.setdefault((rank, peer), []).append((u, batch))
    partners: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (rank, peer), mine in with_peer.items():
        theirs = with_peer.get((peer, rank), [])
        for k in range(max(len(mine), len(theirs))):
            a, b = (s[k][1] if k < len(s) else [] for s in (mine, theirs))
            # both directions in posting order: NCCL matches a pair's p2p operations in order
            if ([t.tag for t in a if t.is_send] != [t.tag for t in b if not t.is_send]
                    or [t.tag for t in a if not t.is_send] != [t.tag for t in b if t.is_send]):
                raise ValueError(
                    f"pipeline messages break NCCL's ordering rule: batch {k} of rank {rank} "
                    f"with rank {peer} [{', '.join(map(str, a)) or 'none'}] does not mirror "
                    f"batch {k} of rank {peer} with rank {rank} "
                    f"[{', '.join(map(str, b)) or 'none'}]")
            partners.setdefault((rank, mine[k][0]), []).append((peer, theirs[k][0]))
    return partners


def replay(plans: Sequence[Sequence[Exchange]], virtual_stages: int,
           v_shape: bool = False) -> None:
    """The schedule simulator: check the ordering rule (match_batches), then run every rank's
    plan as the engine does; ValueError naming the stuck ranks if some would wait forever.

    A rank posts its next batch and waits until every partner batch is posted (a send completes
    only once its receive is posted: NCCL does not buffer); then it runs the slot's passes, each
    once its inputs exist: F(i, k) after F(i, k-1), B(i, k) after F(i, k) and B(i, k+1), with
    W(i, k) after B(i, k), with global chunk k = chunk * pp + rank (or in ZB-V's V, v_shape,
    partition.global_chunk_index).
    """
    pp = len(plans)
    last = pp * virtual_stages - 1
    partners = match_batches(plans)
    at = [0] * pp  # the batch each rank has posted and waits for (len(plan): finished)
    done: set[tuple[str, int, int]] = set()

    def ready(rank: int, op: PipelineOp) -> bool:
        k = global_chunk_index(op.chunk, rank, pp, v_shape)
        if op.kind == "F":
            return k == 0 or ("F", op.microbatch, k - 1) in done
        if op.kind == "W":  # exchanges nothing: after its own B
            return ("B", op.microbatch, k) in done
        return ("F", op.microbatch, k) in done and (k == last or ("B", op.microbatch, k + 1)
                                                    in done)

    progressed = True
    while progressed:
        progressed = False
        for rank, plan in enumerate(plans):
            u = at[rank]
            if u == len(plan) or any(at[peer] < w for peer, w in partners.get((rank, u), [])):
                continue
            for op in plan[u].passes:  # in order, each once its inputs exist
                if not ready(rank, op):
                    break
                done.add((op.kind, op.microbatch, global_chunk_index(op.chunk, rank, pp, v_shape)))
            else:
                at[rank] = u + 1
                progressed = True
    stuck = [rank for rank in range(pp) if at[rank] < len(plans[rank])]
    if stuck:
        raise ValueError("pipeline schedule would deadlock: " + ", ".join(
            stuck_at(plans, partners, rank, at, done, v_shape) for rank in stuck))


def stuck_at(plans: Sequence[Sequence[Exchange]], partners: dict, rank: int, at: list[int],
             done: set, v_shape: bool = False) -> str:
    """Where a stuck rank waits: for a peer's batch, or at a pass whose inputs never come."""
    u, pp = at[rank], len(plans)
    missing = [peer for peer, w in partners.get((rank, u), []) if at[peer] < w]
    if missing:
        upcoming = next((e.passes for e in plans[rank][u:] if e.passes), ())
        return (f"rank {rank} waits for rank {missing[0]} in its batch before "
                f"{'+'.join(map(str, upcoming)) or 'the end'}")
    waiting = next(op for op in plans[rank][u].passes
                   if (op.kind, op.microbatch, global_chunk_index(op.chunk, rank, pp, v_shape))
                   not in done)
    return f"rank {rank} at {waiting} (its inputs never arrive)"


@functools.lru_cache(maxsize=64)
def checked_plans(schedule: str, pp: int, m: int, v: int,
                  forward_only: bool) -> tuple[tuple[Exchange, ...], ...]:
    """Every rank's batches and passes for a schedule, replayed once (cached) before they run."""
    slots = [pipeline_slots(schedule, pp, rank, m, v, forward_only) for rank in range(pp)]
    v_shape = schedule in V_SHAPED  # ZB-V: chunks in a V (partition.py), slots in lockstep
    plans = (lockstep_plans if v_shape else plans_from_slots)(slots, v, m, v_shape)
    replay(plans, v, v_shape)
    return tuple(tuple(plan) for plan in plans)
