"""Pipeline schedules as orders: the sequence of forward and backward passes each rank runs.

A schedule is nothing but, for every pipeline rank, the order in which it runs the forward (F)
and backward (B) pass of each micro-batch on each of its model chunks. The engine
(nanomt.parallel.pipeline.engine) executes any such order; this module writes the three of
Narayanan et al. 2021 as plain loops:

  GPipe (Huang et al. 2019)   all m forwards, then all m backwards. Bubble (p-1)/m, but a rank
                              holds the activations of all m micro-batches.
  1F1B (PipeDream-Flush)      warm-up: rank r runs p-r-1 forwards; steady state: one forward,
                              one backward; cool-down: the remaining backwards. Same bubble
                              (p-1)/m, at most p micro-batches in flight (section 2.2.1).
  interleaved 1F1B            each rank holds v chunks (chunk k of the model on rank k mod p);
                              micro-batches go through in groups of p, chunk by chunk, so the
                              bubble shrinks to (p-1)/(v*m) (section 2.2.2); m must be a
                              multiple of p.

How the engine posts an order's messages, and the one simulator that replays the orders with
their messages (data dependencies and NCCL's posting rules) before any pass runs: posting.py,
explained in docs/pipeline.md ("Messages").
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("1f1b", "gpipe")


@dataclass(frozen=True)
class PipelineOp:
    """One pass on one rank: kind "F" or "B", of `microbatch`, through local model `chunk`."""

    kind: str
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def check_pipeline_config(num_layers: int, pp: int, virtual_stages: int, num_microbatches: int,
                          schedule: str = "1f1b") -> None:
    """Raise a clear ValueError for a pipeline layout that cannot be scheduled."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if virtual_stages > 1 and pp == 1:
        raise ValueError("parallel.virtual_stages > 1 interleaves chunks over pipeline ranks and "
                         "needs parallel.pp > 1")
    chunks = pp * virtual_stages
    if num_layers < chunks:
        raise ValueError(
            f"model.num_layers = {num_layers} cannot fill pp * virtual_stages = {pp} * "
            f"{virtual_stages} = {chunks} chunks of at least one layer: lower "
            f"parallel.virtual_stages (at most {num_layers // pp}) or parallel.pp")
    if num_layers % chunks:
        raise ValueError(f"model.num_layers = {num_layers} is not divisible by pp * "
                         f"virtual_stages = {chunks}; change parallel.pp or "
                         f"parallel.virtual_stages")
    if virtual_stages > 1 and num_microbatches % pp:
        raise ValueError(
            f"interleaved schedules (virtual_stages > 1, {schedule}) need the number of "
            f"micro-batches ({num_microbatches} = train.global_batch_size / "
            f"(train.micro_batch_size * dp)) to be a multiple of "
            f"parallel.pp = {pp}")


# ---- the virtual micro-batch index of interleaved schedules ----------------------------------
def virtual_op(kind: str, index: int, pp: int, v: int) -> PipelineOp:
    """The index-th forward (or backward) of a rank running v chunks.

    Micro-batches go in groups of p: the group's p forwards through chunk 0, then through chunk
    1, ..., chunk v-1, then the next group. Backwards go through the chunks in reverse order.
    """
    group, within = divmod(index, pp * v)
    chunk, offset = divmod(within, pp)
    assert 0 <= chunk < v and 0 <= group * pp + offset, (kind, index, pp, v)
    if kind == "B":
        chunk = v - 1 - chunk
    return PipelineOp(kind, group * pp + offset, chunk)


# ---- the schedules -------------------------------------------------------------------------
def gpipe_order(pp: int, rank: int, m: int, v: int = 1) -> list[PipelineOp]:
    """All forwards, then all backwards (in the same micro-batch order); with v > 1 the
    micro-batches go in groups of p, so m must be a multiple of p."""
    if v > 1 and m % pp:
        raise ValueError(f"GPipe over virtual_stages = {v} chunks needs micro-batches ({m}) to be "
                         f"a multiple of parallel.pp ({pp})")
    forwards = [virtual_op("F", i, pp, v) for i in range(m * v)]
    backwards = [virtual_op("B", i, pp, v) for i in range(m * v)]
    return forwards + backwards


def one_f_one_b_order(pp: int, rank: int, m: int) -> list[PipelineOp]:
    """Warm-up forwards, then one-forward-one-backward, then cool-down backwards."""
    warmup = min(pp - rank - 1, m)
    order = [PipelineOp("F", i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state
        order.append(PipelineOp("F", warmup + i))
        order.append(PipelineOp("B", i))
    for i in range(m - warmup, m):  # cool-down
        order.append(PipelineOp("B", i))
    return order


def interleaved_warmup(pp: int, rank: int, m: int, v: int) -> int:
    """Forwards before the first backward: enough for the last chunk's first backward to arrive."""
    return min((pp - rank - 1) * 2 + (v - 1) * pp, m * v)


def interleaved_order(pp: int, rank: int, m: int, v: int) -> list[PipelineOp]:
    """Interleaved 1F1B over v chunks per rank; m must be a multiple of pp."""
    if m % pp:
        raise ValueError(f"interleaved 1F1B needs micro-batches ({m}) to be a multiple of "
                         f"parallel.pp ({pp})")
    total = m * v
    warmup = interleaved_warmup(pp, rank, m, v)
    order = [virtual_op("F", i, pp, v) for i in range(warmup)]
    for i in range(total - warmup):  # steady state
        order.append(virtual_op("F", warmup + i, pp, v))
        order.append(virtual_op("B", i, pp, v))
    for i in range(total - warmup, total):  # cool-down
        order.append(virtual_op("B", i, pp, v))
    return order


def schedule_order(schedule: str, pp: int, rank: int, m: int, v: int = 1,
                   forward_only: bool = False) -> list[PipelineOp]:
    """The order of passes of pipeline rank `rank`. forward_only keeps the forwards (evaluation)."""
    if schedule == "gpipe":
        order = gpipe_order(pp, rank, m, v)
    elif schedule == "1f1b":
        order = one_f_one_b_order(pp, rank, m) if v == 1 else interleaved_order(pp, rank, m, v)
    else:
        raise ValueError(f"parallel.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if forward_only:
        order = [op for op in order if op.kind == "F"]
    kinds = ("F",) if forward_only else ("F", "B")
    expected = sorted((kind, i, c) for kind in kinds for i in range(m) for c in range(v))
    assert sorted((op.kind, op.microbatch, op.chunk) for op in order) == expected, \
        f"{schedule} order of rank {rank} (pp={pp}, m={m}, v={v}) misses or repeats passes"
    return order


def schedule_orders(schedule: str, pp: int, m: int, v: int,
                    forward_only: bool) -> list[list[PipelineOp]]:
    """Every rank's order (checked against deadlock by posting.replay, with its messages)."""
    return [schedule_order(schedule, pp, rank, m, v, forward_only) for rank in range(pp)]
