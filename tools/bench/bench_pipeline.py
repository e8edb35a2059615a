"""Benchmark (not a test): nanomt's pipeline schedules against torch.distributed.pipelining's.

Both run the same model chunks (nanomt GPT chunks) on the same micro-batches, on gloo CPU ranks
spawned once, one after the other in the same processes. The pairs (TORCH_SCHEDULES):

    nanomt 1f1b (v = 1)          Schedule1F1B
    nanomt 1f1b (v > 1)          ScheduleInterleaved1F1B
    nanomt zb_h1 (v = 1)         ScheduleInterleavedZeroBubble with one stage per rank (its ZB1P
                                 order, ZB-H1 at v = 1), B and W as separate passes
    nanomt zbv (v = 2)           ScheduleZBVZeroBubble: rank r holds chunks r and 2p-1-r (a V)

    python tools/bench/bench_pipeline.py                 # p=4, v=2, m=8
    python tools/bench/bench_pipeline.py --pp 2 --virtual-stages 2 --microbatches 8 --steps 5
    python tools/bench/bench_pipeline.py --pp 2 --virtual-stages 1 --schedule zb_h1

With --schedule zb_h1, nanomt's 1F1B runs first, for its bubble next to ZB-H1's.

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

from nanomt.model import GPT, ModelConfig  # noqa: E402
from nanomt.model.chunks import build_model_chunks  # noqa: E402
from nanomt.parallel.grid import ParallelGrid  # noqa: E402
from nanomt.parallel.pipeline.partition import chunk_layer_ranges  # noqa: E402
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
    chunks = build_model_chunks(cfg, grid, v, seed=1)
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


def v_chunks(cfg: ModelConfig, grid: ParallelGrid) -> list:
    """ZB-V's placement: of the model cut into 2p chunks, rank r holds chunk r and 2p-1-r."""
    pp, rank = grid.pp_size, grid.pp_rank
    ranges, last = chunk_layer_ranges(cfg.num_layers, pp, 2), 2 * pp - 1
    return [GPT(cfg, grid, seed=1, layer_range=ranges[k], pre_process=k == 0,
                post_process=k == last) for k in (rank, last - rank)]


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
    if schedule == "zbv":  # the head's chunk, 2p-1, is on rank 0
        chunks, ids, head_rank = v_chunks(cfg, grid), (rank, 2 * pp - 1 - rank), 0
    else:  # chunk k on rank k mod p
        chunks, ids = build_model_chunks(cfg, grid, v, seed=1), range(rank, pp * v, pp)
        head_rank = pp - 1
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


def bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=4,
                      seq_len=args.seq_len, vocab_size=256)
    grid = ParallelGrid(tp=1, pp=args.pp, dp=1)
    batches = micro_batches(cfg, args.microbatches, args.micro_batch_size)
    ours = bench_nanomt(cfg, grid, args.virtual_stages, batches, args.steps)
    if args.schedule == "zb_h1":
        zb = bench_nanomt(cfg, grid, 1, batches, args.steps, schedule="zb_h1")
        theirs = bench_torch(cfg, grid, 1, batches, args.steps, schedule="zb_h1")
        return {"nanomt": ours, "zb_h1": zb, "torch": theirs}
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
        theirs, their_bubble = result["torch"]
        print(f"p={p} m={m}, {args.layers} layers h={args.hidden} s={args.seq_len} "
              f"b={args.micro_batch_size}, gloo CPU, mean of {args.steps} steps")
        print(f"  1F1B   step {ours * 1e3:8.1f} ms   bubble {our_bubble:.3f}   "
              f"formula (p-1)/m = {formula_bubble('1f1b', p, m):.3f}")
        print(f"  ZB-H1  step {zb * 1e3:8.1f} ms   bubble {zb_bubble:.3f}   "
              f"formula (p-1)/(3m) = {formula_bubble('zb_h1', p, m):.3f} (F = B = W)")
        print(f"  torch ScheduleInterleavedZeroBubble step {theirs * 1e3:8.1f} ms   "
              f"bubble {their_bubble:.3f}")
        print(f"  step-time ratio nanomt ZB-H1 / torch = {zb / theirs:.2f}")
        return
    (ours, our_bubble), (theirs, their_bubble) = result["nanomt"], result["torch"]
    print(f"interleaved 1F1B, p={p} v={v} m={m}, {args.layers} layers h={args.hidden} "
          f"s={args.seq_len} b={args.micro_batch_size}, gloo CPU, mean of {args.steps} steps")
    print(f"  nanomt                      step {ours * 1e3:8.1f} ms   bubble {our_bubble:.3f}")
    print(f"  torch.distributed.pipelining step {theirs * 1e3:8.1f} ms   bubble {their_bubble:.3f}")
    print(f"  step-time ratio nanomt / torch = {ours / theirs:.2f}; "
          f"theoretical bubble (p-1)/(v*m) = {formula_bubble('1f1b', p, m, v):.3f}")


if __name__ == "__main__":
    main()
