"""Benchmark (not a test): where a ZeRO-0/1/2 step's time goes, next to DDP's, on gloo CPU.

    python tools/bench/bench_zero_phases.py [--repeats 5] [--busy 0]

run_all.py reports one number per contender; this splits each step of the same dp=2 model
(run_all.DP_CFG) into its two phases, contenders taking turns as there:

    backward   forward + backward; DDP's all-reduce overlaps it, and ZeRO-2 waits here for its
               reduce-scatter (the full gradient buffer is freed as soon as backward ends)
    step       what follows: ZeRO-0/1 wait for their reduction here, then every sharded stage
               all-reduces the squared norm (16 bytes) and ZeRO-1/2 all-gather the parameters;
               DDP clips locally (its gradients are replicated) and updates

next to a torch model that does not communicate at all, and the bare gloo collectives on a
buffer of the model's size (an all-reduce, and the reduce-scatter + all-gather that replace it
at ZeRO-1/2). --busy N runs N busy-looping processes meanwhile, to see how the ratios move on a
loaded machine (the peers block once per step, ZeRO-1/2 at three collectives).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from run_all import DP_CFG, nanomt_trainer  # noqa: E402

from nanomt.model import GPT, ModelConfig  # noqa: E402
from nanomt.parallel import comm  # noqa: E402
from nanomt.testing import run_distributed  # noqa: E402


def collective_seconds(numel: int, calls: int = 20) -> dict[str, float]:
    """Median seconds of the bare gloo collectives on a flat fp32 buffer of `numel` elements."""
    full, shard = torch.randn(numel), torch.empty(numel // dist.get_world_size())
    ops = {"all_reduce": lambda: dist.all_reduce(full),
           "reduce_scatter": lambda: comm.reduce_scatter_into(shard, full, dist.group.WORLD),
           "all_gather": lambda: comm.all_gather_into(full, shard, dist.group.WORLD)}
    out = {}
    for name, op in ops.items():
        op()
        dist.barrier()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def phased(zero_grad, backward, step):
    """A step callable returning (backward seconds, step seconds)."""
    def run() -> tuple[float, float]:
        zero_grad()
        t0 = time.perf_counter()
        backward()
        t1 = time.perf_counter()
        step()
        return t1 - t0, time.perf_counter() - t1
    return run


def torch_contender(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def clip_and_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return phased(lambda: optimizer.zero_grad(set_to_none=True),
                  lambda: model(*batch).backward(), clip_and_step)


def phases(args) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from nanomt.parallel.grid import ParallelGrid

    cfg = ModelConfig(**DP_CFG)
    grid = ParallelGrid(1, 1, dist.get_world_size())
    batch = (torch.randint(0, 256, (4, cfg.seq_len),
                           generator=torch.Generator().manual_seed(grid.rank)),) * 2
    contenders = {"ddp": torch_contender(DistributedDataParallel(GPT(cfg, None, seed=1)), batch),
                  "no_comm": torch_contender(GPT(cfg, None, seed=1), batch)}
    psi = 0
    for stage in (0, 1, 2):
        model = GPT(cfg, grid, seed=1)
        optimizer = nanomt_trainer(model, grid, stage)
        psi = sum(b.padded_numel for b in optimizer.buckets)
        contenders[f"zero{stage}"] = phased(optimizer.zero_grad,
                                            lambda m=model: m(*batch).backward(), optimizer.step)
    rounds = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, run in contenders.items():
            dist.barrier()
            run()  # warm-up
            measured = [run() for _ in range(args.steps)]
            rounds[name].append(tuple(statistics.median(m[i] for m in measured) for i in (0, 1)))
    result = {name: tuple(statistics.median(r[i] for r in values) for i in (0, 1))
              for name, values in rounds.items()}
    return {"phases": result, "collectives": collective_seconds(psi), "psi": psi}


def busy_loop() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes meanwhile")
    args = parser.parse_args()
    loaders = [mp.get_context("spawn").Process(target=busy_loop, daemon=True)
               for _ in range(args.busy)]
    for proc in loaders:
        proc.start()
    try:
        result = run_distributed(phases, 2, args=(args,), timeout_s=900,
                                 collective_timeout_s=600)[0]
    finally:
        for proc in loaders:
            proc.kill()
    ddp_total = sum(result["phases"]["ddp"])
    print(f"dp=2, {DP_CFG}, Psi={result['psi']:,} fp32, {args.busy} busy processes (rank 0, ms)")
    print("| contender | backward | step | total | total / DDP |\n|---|---|---|---|---|")
    for name, (backward, step) in result["phases"].items():
        print(f"| {name} | {1e3 * backward:.1f} | {1e3 * step:.1f} | {1e3 * (backward + step):.1f}"
              f" | {(backward + step) / ddp_total:.2f} |")
    print("bare gloo collectives on Psi: " + ", ".join(
        f"{name} {1e3 * s:.2f} ms" for name, s in result["collectives"].items()))


if __name__ == "__main__":
    main()
