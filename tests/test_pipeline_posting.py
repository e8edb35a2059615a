"""The pipeline's message plans, without processes: every schedule's plan against NCCL's
ordering rule on the one pipeline communicator (posting.replay), planted violations it must
reject, and the plans' step time against the papers' bubble."""

from __future__ import annotations

import pytest

from nanomt.parallel.pipeline.posting import (
    Exchange,
    Transfer,
    checked_plans,
    match_batches,
    plans_from_slots,
    replay,
    slot_exchanges,
)
from nanomt.parallel.pipeline.schedules import (
    PipelineOp,
    passes,
    schedule_order,
    schedule_slots,
    warmup_forwards,
)


# ---- NCCL's ordering rule on the one pipeline communicator (posting.replay) -------------------
NCCL_CASES = [(schedule, pp, v, m, forward_only)
              for schedule in ("1f1b", "gpipe") for pp in range(2, 9) for v in (1, 2, 3)
              for m in ((1, 2, 3, 5, pp, 2 * pp) if v == 1 else (pp, 2 * pp, 3 * pp))
              for forward_only in (False, True)]


def batches_with(plan, peer: int) -> list[list[tuple[bool, int]]]:
    """The (is_send, tag) of each batch a rank posts with `peer`, in posting order."""
    batches = [sorted((t.is_send, t.tag) for t in exchange.transfers if t.peer == peer)
               for exchange in plan]
    return [batch for batch in batches if batch]


def test_every_schedule_follows_the_ordering_rule():
    """Every schedule's plan (1F1B, interleaved, GPipe, forward-only; pp 2 to 8, v 1 to 3, m
    from 1 to 3p) passes replay, and, checked here independently of replay: the k-th batch a
    rank posts with a neighbour mirrors the neighbour's k-th; each slot's passes run in the
    schedule's order right after the batch holding their receives. A model: no NCCL runs here."""
    for schedule, pp, v, m, forward_only in NCCL_CASES:
        case = (schedule, pp, v, m, forward_only)
        plans = checked_plans(schedule, pp, m, v, forward_only)
        assert len(plans) == pp, case
        for rank, plan in enumerate(plans):
            slots = schedule_slots(schedule, pp, rank, m, v, forward_only)
            assert [e.passes for e in plan if e.passes] == slots, case
            for e in plan:
                receives = [t.op for t in e.transfers if not t.is_send]
                assert set(receives) <= set(e.passes), case  # received just before its pass
            for peer in {(rank - 1) % pp, (rank + 1) % pp} - {rank}:
                mirrored = [sorted((not s, tag) for s, tag in batch)
                            for batch in batches_with(plans[peer], rank)]
                assert batches_with(plan, peer) == mirrored, (case, rank, peer)
    # Megatron's batching: 1F1B's steady state sends an output and receives a gradient in one
    # batch; interleaved exchanges the four messages of a forward-backward pair in one.
    assert any(len(e.transfers) == 2 for e in checked_plans("1f1b", 4, 8, 1, False)[1])
    assert any(len(e.transfers) == 4 for e in checked_plans("1f1b", 4, 8, 2, False)[1])


def test_replay_rejects_posts_out_of_order():
    """A planted violation: two batches of one rank swapped (each still mirrors a batch of the
    neighbour, at the wrong position) fail at once, naming the ranks and the batches."""
    plans = [list(plan) for plan in checked_plans("1f1b", 4, 8, 1, False)]
    replay(plans, 1)
    last = plans[3]  # the last stage talks to rank 2 only: [recv F0], [send B0, recv F1], ...
    posts = [u for u, e in enumerate(last) if e.transfers]
    last[posts[0]], last[posts[1]] = last[posts[1]], last[posts[0]]
    with pytest.raises(ValueError, match=r"break NCCL's ordering rule: batch 0 of rank 2 with "
                                         r"rank 3 \[send F0\] does not mirror batch 0 of "
                                         r"rank 3 with rank 2 \[send B0, recv F1\]"):
        replay(plans, 1)
    # The same messages in different batches on the two ends: rank 0 sends its output and
    # receives the gradient in one batch, rank 1 in two (unsplit boundaries at p=2, m=1).
    slots = [schedule_slots("1f1b", 2, rank, 1) for rank in range(2)]
    unsplit = [slot_exchanges(s, rank, 2, 1, 1) for rank, s in enumerate(slots)]
    with pytest.raises(ValueError, match=r"batch 0 of rank 0 with rank 1 \[send F0, recv B0\] "
                                         r"does not mirror batch 0 of rank 1 with rank 0 "
                                         r"\[recv F0\]"):
        replay(unsplit, 1)
    assert len(plans_from_slots(slots, 1, 1)[0]) > len(unsplit[0])  # split in the peer's order


def step_time(plans, v: int, forward: float = 1.0, backward: float = 2.0,
              weights: float = 0.0) -> float:
    """The step's length when a chunk's forward takes forward / v, its backward backward / v
    (a zero-bubble W pass weights / v), and messages take no time: each rank runs its plan, a batch completing once every partner
    batch is posted (test-side timing of posting.replay's model)."""
    partners = match_batches(plans)
    posted, clock, at = {}, [0.0] * len(plans), [0] * len(plans)
    while any(u < len(plan) for u, plan in zip(at, plans)):
        for rank, plan in enumerate(plans):
            if at[rank] == len(plan):
                continue
            posted.setdefault((rank, at[rank]), clock[rank])
            batch = [(rank, at[rank])] + partners.get((rank, at[rank]), [])
            if all(b in posted for b in batch):
                clock[rank] = max(posted[b] for b in batch) + sum(
                    {"F": forward, "B": backward, "W": weights}[op.kind] / v
                    for op in plan[at[rank]].passes)
                at[rank] += 1
    return max(clock)


def test_plans_reach_the_papers_bubble():
    """Waiting for every batch costs nothing beyond the schedule's own bubble: with messages
    that take no time, a step lasts m (F + B) + (p-1)(F + B)/v, the papers' bubble (p-1)/(v m),
    for 1F1B and interleaved 1F1B. A plan that stalls shows: 1F1B exchanging once per
    forward-backward pair (docs/performance.md, "1f1b_vs_torch")."""
    for pp, m, v in [(2, 8, 1), (4, 8, 1), (4, 3, 1), (2, 8, 2), (4, 8, 2), (4, 16, 2), (2, 6, 3)]:
        plans = checked_plans("1f1b", pp, m, v, False)
        assert step_time(plans, v) == pytest.approx(m * 3 + (pp - 1) * 3 / v), (pp, m, v)
    # 1F1B exchanging once per steady-state pair, as interleaved does: it runs, but stalls.
    pairs = []
    for rank in range(4):
        forwards, backwards = passes("F", 4, 8, 1), passes("B", 4, 8, 1)
        w = warmup_forwards("1f1b", 4, rank, 8, 1)
        pairs.append([(f,) for f in forwards[:w]] + list(zip(forwards[w:], backwards))
                     + [(b,) for b in backwards[8 - w:]])
    plans = plans_from_slots(pairs, 1, 8)
    replay(plans, 1)
    assert step_time(plans, 1) > 1.5 * (8 * 3 + 3 * 3)


def test_interleaved_exchanges_once_per_pair():
    """Interleaved 1F1B exchanging after every pass, instead of once per forward-backward pair
    of the steady state, would hang: replay says so."""
    slots = [[(op,) for op in schedule_order("1f1b", 4, rank, 8, 2)] for rank in range(4)]
    with pytest.raises(ValueError, match="would deadlock: rank 0 waits for rank"):
        replay(plans_from_slots(slots, 2, 8), 2)


def test_replay_catches_cycles_through_three_ranks():
    """Every pair of batches mirrors its partner, but each rank's first batch waits for a batch
    its peer posts second: a cycle through three ranks (ring of p=3, v=2 messages)."""
    op = PipelineOp("F", 0)

    def batch(is_send: bool, peer: int, tag: int) -> Exchange:
        return Exchange((Transfer(is_send, op, peer, tag),))

    ring = [[batch(True, 1, 0), batch(False, 2, 2)],   # rank 0: send to 1, then recv from 2
            [batch(True, 2, 1), batch(False, 0, 0)],   # rank 1: send to 2, then recv from 0
            [batch(True, 0, 2), batch(False, 1, 1)]]   # rank 2: send to 0, then recv from 1
    with pytest.raises(ValueError, match=r"rank 0 waits for rank 1 .*rank 1 waits for rank 2 "
                                         r".*rank 2 waits for rank 0"):
        replay(ring, virtual_stages=2)
    receive_first = [[batch(False, 2, 2), batch(True, 1, 0)], ring[1], ring[2]]
    replay(receive_first, virtual_stages=2)  # rank 0 receives first: the ring unwinds
