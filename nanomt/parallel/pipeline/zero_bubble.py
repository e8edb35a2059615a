"""The zero-bubble schedules (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): ZB-H1, ZB-V.

Each backward becomes B, the gradient of the input, which the previous stage waits for, and W,
the gradient of the weights, which nobody waits for (nanomt/parallel/weight_grad_store.py; the
engine's layer that runs them: zero_bubble_step.py).

ZB-H1 (parallel.schedule=zb_h1, one chunk per rank). The F and B passes run in 1F1B's order
(schedules.py), so a rank holds 1F1B's micro-batches in flight; each B is followed by its W,
except that rank r runs the W of its last r+1 micro-batches after all its B passes, so the
cool-down's B passes reach the first stages sooner and those W fill the waits there. With F, B
and W of equal length the paper's bubble is (p-1)/(3m) against 1F1B's (p-1)/m; this order, with
posting.py's blocking exchanges, reaches it at p = 2 and stays below (p-1)/(2m) for p up to 8
(tests/test_zero_bubble.py times it). A W exchanges no message: in the steady state it shares
the next forward's slot, after the batch that sends the B's gradient and receives the forward's
input (1F1B's batch); in the cool-down it has a slot of its own.

ZB-V (parallel.schedule=zbv, two chunks per rank in a V: rank r holds chunks r and 2p-1-r, so
the first and the last are on rank 0 and chunks p-1 and p, the V's turn, share rank p-1). The
order is played out time step by time step (`zbv_steps`: B first, then F within 1F1B's first
stage's activations, then W), and its slots are those steps: every message is posted at the
step after its pass on both sides (posting.lockstep_plans). With F = B = W its bubble is
(p-1)/(6m), a third of interleaved 1F1B's (p-1)/(2m) at v = 2, at the activations of 1F1B's
first stage on every rank.
"""

from __future__ import annotations

import functools

from nanomt.parallel.pipeline.partition import global_chunk_index
from nanomt.parallel.pipeline.schedules import PipelineOp, passes, schedule_slots

V_SHAPED = ("zbv",)  # schedules whose two chunks per rank sit in a V (partition.py)


def pipeline_slots(schedule: str, pp: int, rank: int, m: int, v: int = 1,
                   forward_only: bool = False) -> list[tuple[PipelineOp, ...]]:
    """Any schedule's slots on rank `rank`: ZB-H1's and ZB-V's here (ZB-V's are time steps,
    () idle), the others' from schedules.py (evaluation under ZB-H1 runs the forwards alone,
    as every schedule's does; under ZB-V in the V)."""
    if schedule == "zb_h1" and not forward_only:
        return zb_h1_slots(pp, rank, m)
    if schedule == "zbv":
        return list(zbv_steps(pp, m, forward_only)[rank])
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


@functools.lru_cache(maxsize=32)
def zbv_steps(pp: int, m: int, forward_only: bool = False
              ) -> tuple[tuple[tuple[PipelineOp, ...], ...], ...]:
    """ZB-V on every rank, time step by time step (one pass, or () idle), played out with F, B
    and W one step each and messages arriving by the next step. At each step every rank runs
    the first of these that can run:

      1. a B whose output gradient is there, chunk 0's first (the previous stage waits);
      2. an F whose input is there, chunk 1's first (nearer the loss: its B comes sooner),
         unless the rank holds 2p passes whose W has not run (the activations of 1F1B's first
         stage: p micro-batches of two chunks each);
      3. the oldest W waiting.

    Each micro-batch's passes of one chunk run in micro-batch order (F, B and W alike)."""
    last = 2 * pp - 1
    finished: dict[tuple[str, int, int], int] = {}  # (kind, micro-batch, global chunk): step
    steps: list[list[tuple[PipelineOp, ...]]] = [[] for _ in range(pp)]
    next_op = [{(kind, c): 0 for kind in "FB" for c in (0, 1)} for _ in range(pp)]
    waiting_w: list[list[PipelineOp]] = [[] for _ in range(pp)]
    held, left = [0] * pp, [2 * m * (1 if forward_only else 3)] * pp

    def can_run(rank: int, kind: str, c: int, step: int) -> bool:
        i, k = next_op[rank][(kind, c)], global_chunk_index(c, rank, pp, v_shape=True)
        inputs = [("F", i, k - 1)] if kind == "F" else [("F", i, k), ("B", i, k + 1)]
        return i < m and all(finished.get(need, step) < step for need in inputs
                             if 0 <= need[2] <= last)

    while any(left):
        step = len(steps[0])
        for rank in range(pp):
            candidates = [] if forward_only else [("B", 0), ("B", 1)]
            candidates += [("F", 1), ("F", 0)] if held[rank] < 2 * pp else []
            kind, c = next(((kind, c) for kind, c in candidates
                            if can_run(rank, kind, c, step)), ("W", -1))
            if kind != "W":
                op = PipelineOp(kind, next_op[rank][(kind, c)], c)
                next_op[rank][(kind, c)] += 1
                finished[(kind, op.microbatch, global_chunk_index(c, rank, pp, True))] = step
                held[rank] += 1 if kind == "F" and not forward_only else 0
                waiting_w[rank] += [PipelineOp("W", op.microbatch, c)] if kind == "B" else []
            elif waiting_w[rank]:
                op = waiting_w[rank].pop(0)
                held[rank] -= 1
            else:
                steps[rank].append(())  # idle: nothing can run yet
                continue
            steps[rank].append((op,))
            left[rank] -= 1
    return tuple(tuple(rank_steps) for rank_steps in steps)
