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
the first and the last are on rank 0 and chunks p-1 and p, the V's turn, share rank p-1). Each
rank runs a fixed pattern up to its last forward, as the paper's ZB-V figure does (`zbv_head`:
a warm-up to 2p chunk passes held, 1F1B's first stage's activations, then F, B, W of each chunk
in turn, each B followed by its own W), then B first, else its oldest W, so the W of the
cool-down fill the waits for the last gradients. The order is played out time step by time step (`zbv_steps`), and its slots are
those steps: every message is posted at the end of the step that made it, on both sides
(posting.lockstep_plans); the engine waits for a batch only before the pass that takes its
message (zero_bubble_step.ZeroBubbleVStep). With F = B = W its bubble is (p-1)/(6m), a third of
interleaved 1F1B's (p-1)/(2m) at v = 2; with B = 2F = 2W, as on this CPU, it stays below
interleaved's (tests/test_zero_bubble.py times both).
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


def zbv_head(pp: int, rank: int, m: int) -> list[PipelineOp]:
    """ZB-V on rank `rank` up to its last forward (chunk 0 is global chunk `rank`, chunk 1 is
    2p-1-rank):

      warm-up   2(p-r)-1 forwards of chunk 0, then r pairs (F chunk 1, F chunk 0), then p-r
                times F, B, W of chunk 1: 2p chunk passes held at most, 1F1B's first stage;
      steady    F, B, W of chunk 0, then F, B, W of chunk 1, each B followed by its own W, so
                the cycle is 1F1B's with the backward split in two. Timed with B = 2F = 2W
                at p = 2, m = 8 it idles 0.03 (tests/test_zero_bubble.py), where the greedy
                order before it, B first in the steady state too, idled 0.27.

    Passes past m micro-batches (or before their F or B) are left out."""
    pattern = [("F", 0)] * (2 * (pp - rank) - 1) + [("F", 1), ("F", 0)] * rank
    pattern += [("F", 1), ("B", 1), ("W", 1)] * (pp - rank)
    pattern += [("F", 0), ("B", 0), ("W", 0), ("F", 1), ("B", 1), ("W", 1)] * m
    count = {(kind, c): 0 for kind in "FBW" for c in (0, 1)}
    order = []
    for kind, c in pattern:
        if count[("F", 0)] == count[("F", 1)] == m:
            break
        before = {"F": m, "B": count[("F", c)], "W": count[("B", c)]}[kind]
        if count[(kind, c)] < before:
            order.append(PipelineOp(kind, count[(kind, c)], c))
            count[(kind, c)] += 1
    return order


@functools.lru_cache(maxsize=32)
def zbv_steps(pp: int, m: int, forward_only: bool = False
              ) -> tuple[tuple[tuple[PipelineOp, ...], ...], ...]:
    """ZB-V on every rank, time step by time step (one pass, or () idle), played out with F, B
    and W one step each and messages arriving by the next step. A rank runs its head
    (`zbv_head`) in order, idling where a pass's input is not there yet; after its last forward
    (evaluation: from the start), at each step the first of these that can run:

      1. a B whose output gradient is there, chunk 0's first (the previous stage waits);
         under forward_only an F whose input is there, chunk 1's first;
      2. the oldest W waiting: the cool-down's W fill the waits for the last gradients.

    Each chunk's F and B run in micro-batch order."""
    last = 2 * pp - 1
    finished: dict[tuple[str, int, int], int] = {}  # (kind, micro-batch, global chunk): step
    steps: list[list[tuple[PipelineOp, ...]]] = [[] for _ in range(pp)]
    heads = [[] if forward_only else zbv_head(pp, rank, m)[::-1] for rank in range(pp)]
    next_op = [{(kind, c): 0 for kind in "FB" for c in (0, 1)} for _ in range(pp)]
    waiting_w: list[list[PipelineOp]] = [[] for _ in range(pp)]
    tail = [("F", 1), ("F", 0)] if forward_only else [("B", 0), ("B", 1)]

    def ready(rank: int, op: PipelineOp, step: int) -> bool:
        i, k = op.microbatch, global_chunk_index(op.chunk, rank, pp, v_shape=True)
        inputs = {"F": [("F", i, k - 1)], "B": [("F", i, k), ("B", i, k + 1)], "W": []}
        return i < m and all(finished.get(need, step) < step for need in inputs[op.kind]
                             if 0 <= need[2] <= last)

    def choose(rank: int, step: int) -> PipelineOp | None:
        if heads[rank]:
            return heads[rank].pop() if ready(rank, heads[rank][-1], step) else None
        for kind, c in tail:
            op = PipelineOp(kind, next_op[rank][(kind, c)], c)
            if ready(rank, op, step):
                return op
        return waiting_w[rank].pop(0) if waiting_w[rank] else None

    left = pp * 2 * m * (1 if forward_only else 3)  # passes still to run, all ranks
    while left:
        step, ran = len(steps[0]), 0
        for rank in range(pp):
            op = choose(rank, step)
            steps[rank].append(() if op is None else (op,))
            if op is None:
                continue
            finished[(op.kind, op.microbatch, global_chunk_index(op.chunk, rank, pp, True))] = step
            if op.kind in "FB":
                next_op[rank][(op.kind, op.chunk)] = op.microbatch + 1
            if op.kind == "B":
                waiting_w[rank].append(PipelineOp("W", op.microbatch, op.chunk))
            elif op.kind == "W" and op in waiting_w[rank]:
                waiting_w[rank].remove(op)
            left, ran = left - 1, ran + 1
        if not ran and not any(s == step - 1 for s in finished.values()):
            raise ValueError(f"ZB-V's order is stuck at step {step} (pp={pp}, m={m})")
    return tuple(tuple(rank_steps) for rank_steps in steps)
