"""Benchmark (not a test): nanomt's (interleaved) 1F1B against torch.distributed.pipelining's.

Both run the same model chunks (nanomt GPT chunks, chunk k on rank k mod p) on the same
micro-batches, on gloo CPU ranks spawned once, one after the other in the same processes:

    python tools/bench/bench_pipeline.py                 # p=4, v=2, m=8
    python tools/bench/bench_pipeline.py --pp 2 --virtual-stages 2 --microbatches 8 --steps 5
    python tools/bench/bench_pipeline.py --pp 2 --virtual-stages 1 --schedule zb_h1

With --schedule zb_h1, nanomt's ZB-H1 runs against nanomt's 1F1B instead (torch's zero-bubble
schedules are not compared yet), the bubble counting W passes as busy.

Prints the mean step time of each (the slowest rank's), their ratio, and each one's measured
bubble (idle / busy time per rank, from the start and end of every forward and backward pass)
next to the theoretical (p-1)/(v*m). torch's loss function runs outside its timed passes, ours
inside the last chunk's forward; on a small shared CPU, timings are noisy: run a few times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nanomt.model import ModelConfig  # noqa: E402
from nanomt.parallel.grid import ParallelGrid  # noqa: E402
from nanomt.model.chunks import build_model_chunks  # noqa: E402
from nanomt.parallel.pipeline import Timeline  # noqa: E402
from nanomt.parallel.pipeline import forward_backward_pipelining  # noqa: E402
from nanomt.parallel.pipeline.timeline import bubble_fraction  # noqa: E402
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
    chunks = build_model_chunks(cfg, grid, v, seed=1)
    timeline, times = Timeline(), []
    for step in range(steps + 1):  # step 0 warms up
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        timeline.begin_step(step)
        dist.barrier()
        t0 = time.perf_counter()
        forward_backward_pipelining(chunks, batches, grid, schedule=schedule, timeline=timeline)
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


def bench_torch(cfg, grid, v, batches, steps) -> tuple[float, float]:
    """torch's Schedule1F1B (v = 1) or ScheduleInterleaved1F1B (v > 1) on the same chunks."""
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleInterleaved1F1B,
    )

    chunks = build_model_chunks(cfg, grid, v, seed=1)
    pp, rank = grid.pp_size, grid.pp_rank
    events: list = []
    stages = []
    for local, chunk in enumerate(chunks):
        stage = PipelineStage(chunk, local * pp + rank, pp * v, torch.device("cpu"),
                              group=grid.pp_group)
        stage.forward_one_chunk = timed(stage.forward_one_chunk, events, "F", local)
        stage.backward_one_chunk = timed(stage.backward_one_chunk, events, "B", local)
        stages.append(stage)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[..., : cfg.vocab_size].flatten(0, 1), targets.flatten())

    schedule = (Schedule1F1B(stages[0], len(batches), loss_fn=loss_fn) if v == 1 else
                ScheduleInterleaved1F1B(stages, len(batches), loss_fn=loss_fn))
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
            schedule.step(inputs, target=targets if rank == pp - 1 else None)
        elif rank == pp - 1:
            schedule.step(target=targets, losses=[])
        else:
            schedule.step()
        if step:
            times.append(time.perf_counter() - t0)
    return slowest_mean(times), gathered_bubble(events)


def bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=4,
                      seq_len=args.seq_len, vocab_size=256)
    grid = ParallelGrid(tp=1, pp=args.pp, dp=1)
    batches = micro_batches(cfg, args.microbatches, args.micro_batch_size)
    ours = bench_nanomt(cfg, grid, args.virtual_stages, batches, args.steps)
    if args.schedule == "zb_h1":
        zb = bench_nanomt(cfg, grid, 1, batches, args.steps, schedule="zb_h1")
        return {"nanomt": ours, "zb_h1": zb}
    theirs = bench_torch(cfg, grid, args.virtual_stages, batches, args.steps)
    return {"nanomt": ours, "torch": theirs}


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
    parser.add_argument("--schedule", choices=("1f1b", "zb_h1"), default="1f1b")
    args = parser.parse_args()
    result = run_distributed(bench, world_size=args.pp, args=(args,), timeout_s=1200,
                             collective_timeout_s=600)[0]
    p, v, m = args.pp, args.virtual_stages, args.microbatches
    if args.schedule == "zb_h1":
        (ours, our_bubble), (zb, zb_bubble) = result["nanomt"], result["zb_h1"]
        print(f"p={p} m={m}, {args.layers} layers h={args.hidden} s={args.seq_len} "
              f"b={args.micro_batch_size}, gloo CPU, mean of {args.steps} steps")
        print(f"  1F1B   step {ours * 1e3:8.1f} ms   bubble {our_bubble:.3f}   "
              f"formula (p-1)/m = {(p - 1) / m:.3f}")
        print(f"  ZB-H1  step {zb * 1e3:8.1f} ms   bubble {zb_bubble:.3f}   "
              f"formula (p-1)/(3m) = {(p - 1) / (3 * m):.3f} (F = B = W)")
        return
    (ours, our_bubble), (theirs, their_bubble) = result["nanomt"], result["torch"]
    print(f"interleaved 1F1B, p={p} v={v} m={m}, {args.layers} layers h={args.hidden} "
          f"s={args.seq_len} b={args.micro_batch_size}, gloo CPU, mean of {args.steps} steps")
    print(f"  nanomt                      step {ours * 1e3:8.1f} ms   bubble {our_bubble:.3f}")
    print(f"  torch.distributed.pipelining step {theirs * 1e3:8.1f} ms   bubble {their_bubble:.3f}")
    print(f"  step-time ratio nanomt / torch = {ours / theirs:.2f}; "
          f"theoretical bubble (p-1)/(v*m) = {(p - 1) / (v * m):.3f}")


if __name__ == "__main__":
    main()
