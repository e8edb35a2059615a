"""ZB-H1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): 1F1B with the backward split.

Each backward becomes B, the gradient of the input, which the previous stage waits for, and W,
the gradient of the weights, which nobody waits for (nanomt/parallel/weight_grad_store.py). The
F and B passes run in 1F1B's order (schedules.py), so a rank holds 1F1B's micro-batches in
flight; each B is followed by its W, except that rank r runs the W of its last r+1
micro-batches after all its B passes, so the cool-down's B passes reach the first stages
sooner and those W fill the waits there. With F, B and W of equal length the paper's bubble is
(p-1)/(3m) against 1F1B's (p-1)/m; this order, with posting.py's blocking exchanges, reaches it
at p = 2 and stays below (p-1)/(2m) for p up to 8 (tests/test_zero_bubble.py times it).

A W exchanges no message: in the steady state it shares the next forward's slot, after the
batch that sends the B's gradient and receives the forward's input (1F1B's batch); in the
cool-down it has a slot of its own, run while the next gradient is on its way.
"""

from __future__ import annotations

from nanomt.parallel.pipeline.schedules import PipelineOp, passes, schedule_slots


def pipeline_slots(schedule: str, pp: int, rank: int, m: int, v: int = 1,
                   forward_only: bool = False) -> list[tuple[PipelineOp, ...]]:
    """Any schedule's slots on rank `rank`: ZB-H1's here, the others' from schedules.py
    (evaluation under ZB-H1 runs the forwards alone, as every schedule's does)."""
    if schedule == "zb_h1" and not forward_only:
        return zb_h1_slots(pp, rank, m)
    return schedule_slots(schedule, pp, rank, m, v, forward_only)


def zb_h1_order(pp: int, rank: int, m: int) -> list[PipelineOp]:
    """ZB-H1 on rank `rank` (v = 1): 1F1B's forwards and backwards, each B followed by its W,
    except that the W of the last r+1 micro-batches wait until every B has run: the B passes
    of the cool-down then reach the first stages sooner, and the W fill the last waits."""
    deferred = min(rank + 1, m)
    warmup = min(pp - rank - 1, m)
    order = passes("F", pp, m, 1)[:warmup]
    for backward in passes("B", pp, m, 1):
        forward = warmup + backward.microbatch
        order += [PipelineOp("F", forward)] if forward < m else []
        order.append(backward)
        if backward.microbatch < m - deferred:
            order.append(PipelineOp("W", backward.microbatch))
    return order + [PipelineOp("W", i) for i in range(m - deferred, m)]


def zb_h1_slots(pp: int, rank: int, m: int) -> list[tuple[PipelineOp, ...]]:
    """ZB-H1's passes slot by slot: a W joins the forward after it, or stands alone."""
    slots: list[tuple[PipelineOp, ...]] = []
    for op in zb_h1_order(pp, rank, m):
        if op.kind == "F" and slots and slots[-1][-1].kind == "W":
            slots[-1] += (op,)
        else:
            slots.append((op,))
    return slots
