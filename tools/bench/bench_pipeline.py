"""Benchmark (not a test): nanomt's pipeline schedules against torch.distributed.pipelining's.

Both run the same model chunks (nanomt GPT chunks) on the same micro-batches, on gloo CPU ranks
spawned once, one after the other in the same processes. The pairs (TORCH_SCHEDULES):

    nanomt 1f1b (v = 1)          Schedule1F1B
    nanomt 1f1b (v > 1)          ScheduleInterleaved1F1B
    nanomt zb_h1 (v = 1)         ScheduleInterleavedZeroBubble with one stage per rank (its ZB1P
                                 order, ZB-H1 at v = 1), B and W as separate passes
    nanomt zbv (v = 2)           ScheduleZBVZeroBubble: rank r holds chunks r and 2p-1-r (a V),
                                 the embeddings untied (nanomt's zbv requires it)

    python tools/bench/bench_pipeline.py                 # p=4, v=2, m=8
    python tools/bench/bench_pipeline.py --pp 2 --virtual-stages 2 --microbatches 8 --steps 5
    python tools/bench/bench_pipeline.py --pp 2 --virtual-stages 1 --schedule zb_h1
    python tools/bench/bench_pipeline.py --pp 2 --schedule zbv

With --schedule zb_h1 (zbv), nanomt's 1F1B (interleaved, v = 2) runs first, for its bubble
next to the zero-bubble schedule's.

Prints the mean step time of each (the slowest rank's), their ratio, and each one's measured
bubble (idle / busy time per rank, from the start and end of every F, B and W pass) next to the
planner's formula (nanomt.planner.schedule_costs). torch's loss function runs outside its timed
passes, ours inside the last chunk's forward; on a small shared CPU, timings are noisy: run a
few times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nanomt.model import ModelConfig  # noqa: E402
from nanomt.model.chunks import build_model_chunks  # noqa: E402
from nanomt.parallel.grid import ParallelGrid  # noqa: E402
from nanomt.parallel.pipeline.partition import global_chunk_index, rank_of_chunk  # noqa: E402
from nanomt.parallel.pipeline.zero_bubble import V_SHAPED  # noqa: E402
from nanomt.parallel.pipeline import Timeline  # noqa: E402
from nanomt.parallel.forward_backward import get_forward_backward_func  # noqa: E402
from nanomt.parallel.pipeline.timeline import bubble_fraction  # noqa: E402
from nanomt.planner.schedule_costs import bubble_fraction as formula_bubble  # noqa: E402
from nanomt.testing import run_distributed  # noqa: E402


def micro_batches(cfg: ModelConfig, m: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (m, batch, cfg.seq_len + 1), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def gathered_bubble(events: list[list]) -> float:
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, events)
    return bubble_fraction(everyone)[0]


def slowest_mean(times: list[float]) -> float:
    t = torch.tensor([sum(times) / len(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def bench_nanomt(cfg, grid, v, batches, steps, schedule: str = "1f1b") -> tuple[float, float]:
    """nanomt's `schedule` as training runs it (get_forward_backward_func)."""
    chunks = build_model_chunks(cfg, grid, v, seed=1, schedule=schedule)
    run_schedule = get_forward_backward_func(SimpleNamespace(pp=grid.pp_size, virtual_stages=v),
                                             schedule)
    timeline, times = Timeline(), []
    for step in range(steps + 1):  # step 0 warms up
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        timeline.begin_step(step)
        dist.barrier()
        t0 = time.perf_counter()
        run_schedule(chunks, batches, grid, timeline=timeline)
        if step:
            times.append(time.perf_counter() - t0)
    return slowest_mean(times), gathered_bubble(timeline.events)


def timed(method, events: list, kind: str, chunk: int):
    """Wrap a PipelineStage method to record its passes as (kind, micro-batch, chunk, t0, t1)."""
    def wrapper(chunk_id, *args, **kwargs):
        start = time.time()
        result = method(chunk_id, *args, **kwargs)
        events.append([kind, chunk_id, chunk, start, time.time()])
        return result
    return wrapper


def torch_schedule(schedule: str, stages: list, m: int, loss_fn):
    """torch's counterpart of nanomt's `schedule` (module docstring) over this rank's stages."""
    from torch.distributed import pipelining as pipe

    if schedule == "zbv":
        return pipe.ScheduleZBVZeroBubble(stages, m, loss_fn=loss_fn)
    if schedule == "zb_h1":
        return pipe.ScheduleInterleavedZeroBubble(stages, m, loss_fn=loss_fn)
    if len(stages) == 1:
        return pipe.Schedule1F1B(stages[0], m, loss_fn=loss_fn)
    return pipe.ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn)


def bench_torch(cfg, grid, v, batches, steps, schedule: str = "1f1b") -> tuple[float, float]:
    """torch's schedule for nanomt's `schedule` with v chunks per rank, on the same chunks;
    a W pass (backward_weight_one_chunk, zero-bubble schedules) is timed as busy."""
    from torch.distributed.pipelining import PipelineStage

    pp, rank = grid.pp_size, grid.pp_rank
    v_shape = schedule in V_SHAPED  # ZB-V: the head's chunk, 2p-1, is on rank 0
    chunks = build_model_chunks(cfg, grid, v, seed=1, schedule=schedule)
    ids = [global_chunk_index(local, rank, pp, v_shape) for local in range(v)]
    head_rank = rank_of_chunk(pp * v - 1, pp, v_shape)
    events: list = []
    stages = []
    for local, (chunk, stage_id) in enumerate(zip(chunks, ids)):
        stage = PipelineStage(chunk, stage_id, pp * v, torch.device("cpu"), group=grid.pp_group)
        stage.forward_one_chunk = timed(stage.forward_one_chunk, events, "F", local)
        stage.backward_one_chunk = timed(stage.backward_one_chunk, events, "B", local)
        stage.backward_weight_one_chunk = timed(stage.backward_weight_one_chunk, events, "W",
                                                local)
        stages.append(stage)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[..., : cfg.vocab_size].flatten(0, 1), targets.flatten())

    runner = torch_schedule(schedule, stages, len(batches), loss_fn)
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    times = []
    for step in range(steps + 1):
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        events.clear()
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            runner.step(inputs, target=targets if rank == head_rank else None,
                        losses=[] if rank == head_rank else None)
        elif rank == head_rank:
            runner.step(target=targets, losses=[])
        else:
            runner.step()
        if step:
            times.append(time.perf_counter() - t0)
    return slowest_mean(times), gathered_bubble(events)


ZERO_BUBBLE = {"zb_h1": ("ZB-H1", "ScheduleInterleavedZeroBubble", 1),
               "zbv": ("ZB-V", "ScheduleZBVZeroBubble", 2)}  # name, torch's, chunks per rank


def chunks_per_rank(args: argparse.Namespace) -> int:
    return ZERO_BUBBLE[args.schedule][2] if args.schedule in ZERO_BUBBLE else args.virtual_stages


def bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=4,
                      seq_len=args.seq_len, vocab_size=256,
                      tie_embeddings=False if args.schedule == "zbv" else None)
    grid = ParallelGrid(tp=1, pp=args.pp, dp=1)
    batches = micro_batches(cfg, args.microbatches, args.micro_batch_size)
    v = chunks_per_rank(args)
    ours = bench_nanomt(cfg, grid, v, batches, args.steps)  # (interleaved) 1F1B
    if args.schedule in ZERO_BUBBLE:
        zb = bench_nanomt(cfg, grid, v, batches, args.steps, schedule=args.schedule)
        theirs = bench_torch(cfg, grid, v, batches, args.steps, schedule=args.schedule)
        return {"nanomt": ours, "zero_bubble": zb, "torch": theirs}
    theirs = bench_torch(cfg, grid, v, batches, args.steps)
    return {"nanomt": ours, "torch": theirs}


def print_zero_bubble(args: argparse.Namespace, result: dict) -> None:
    p, v, m = args.pp, chunks_per_rank(args), args.microbatches
    name, peer, _ = ZERO_BUBBLE[args.schedule]
    (ours, our_bubble), (zb, zb_bubble) = result["nanomt"], result["zero_bubble"]
    theirs, their_bubble = result["torch"]
    print(f"p={p} v={v} m={m}, {args.layers} layers h={args.hidden} s={args.seq_len} "
          f"b={args.micro_batch_size}, gloo CPU, mean of {args.steps} steps")
    print(f"  nanomt 1F1B (v={v})   step {ours * 1e3:8.1f} ms   bubble {our_bubble:.3f}   "
          f"formula {formula_bubble('1f1b', p, m, v):.3f}")
    print(f"  nanomt {name:<12} step {zb * 1e3:8.1f} ms   bubble {zb_bubble:.3f}   "
          f"formula {formula_bubble(args.schedule, p, m, v):.3f} (F = B = W)")
    print(f"  torch {peer} step {theirs * 1e3:8.1f} ms   bubble {their_bubble:.3f}")
    print(f"  step-time ratio nanomt {name} / torch = {zb / theirs:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--virtual-stages", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--schedule", choices=("1f1b", *ZERO_BUBBLE), default="1f1b")
    args = parser.parse_args()
    result = run_distributed(bench, world_size=args.pp, args=(args,), timeout_s=1200,
                             collective_timeout_s=600)[0]
    if args.schedule in ZERO_BUBBLE:
        print_zero_bubble(args, result)
        return
    p, v, m = args.pp, args.virtual_stages, args.microbatches
    (ours, our_bubble), (theirs, their_bubble) = result["nanomt"], result["torch"]
    print(f"interleaved 1F1B, p={p} v={v} m={m}, {args.layers} layers h={args.hidden} "
          f"s={args.seq_len} b={args.micro_batch_size}, gloo CPU, mean of {args.steps} steps")
    print(f"  nanomt                      step {ours * 1e3:8.1f} ms   bubble {our_bubble:.3f}")
    print(f"  torch.distributed.pipelining step {theirs * 1e3:8.1f} ms   bubble {their_bubble:.3f}")
    print(f"  step-time ratio nanomt / torch = {ours / theirs:.2f}; "
          f"theoretical bubble (p-1)/(v*m) = {formula_bubble('1f1b', p, m, v):.3f}")


if __name__ == "__main__":
    main()
