"""Benchmark (not a test): nanomt ZeRO-2 and ZeRO-3 against torch DDP and FSDP2 on gloo CPU.

    python tools/bench/bench_zero.py [--world 2] [--steps 6] [--layers 4] [--hidden 256]

Every contender trains the same GPT (nanomt.model.GPT, fp32, same data) for a few steps;
nanomt_zero3 prefetches one layer's all-gather ahead (parallel.zero3_prefetch=1), zero3_sync
gathers each layer just before use (0). The script prints the median step time and the
per-rank bytes of parameters + gradients + optimizer state at the step's peak (after backward,
before the optimizer step: every gradient exists), each as a ratio to DDP. The peers (DDP,
FSDP2 `fully_shard`) are used here only, as references: nanomt itself never imports them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def model_state_bytes(params, optimizer_tensors) -> int:
    """Bytes of distinct storages held by parameters, their gradients and optimizer tensors."""
    seen, total = set(), 0
    tensors = list(params) + [p.grad for p in params if p.grad is not None] + optimizer_tensors
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes() > 0:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def torch_optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0]


def run_peer(kind: str, cfg, batches, steps: int) -> tuple[list[float], int]:
    """DDP or FSDP2 with torch.optim.AdamW; bytes measured after the last backward."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from nanomt.model import GPT

    model = GPT(cfg, None, seed=1)
    if kind == "ddp":
        wrapped = DistributedDataParallel(model)
    else:
        for layer in model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, foreach=False)
    times, peak = [], 0
    for step in range(steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        wrapped(*batches[step]).backward()
        if step > 0:  # Adam's moments exist from the first step on
            peak = model_state_bytes(list(wrapped.parameters()),
                                     torch_optimizer_tensors(optimizer))
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return times, peak


def run_nanomt(stage: int, cfg, batches, steps: int,
               prefetch: int = 1) -> tuple[list[float], int]:
    """nanomt's GradientBuffer + ShardedAdamW (ZeRO-3: `prefetch` layers gathered ahead, 0 = synchronous);
    bytes recorded by step() after the last backward."""
    from nanomt.model import GPT
    from nanomt.parallel.grid import ParallelGrid
    from nanomt.optim import ShardedAdamW
    from nanomt.parallel.data_parallel import GradientBuffer

    grid = ParallelGrid(1, 1, dist.get_world_size())
    model = GPT(cfg, grid, seed=1)
    buffer = GradientBuffer([model], grid, zero_stage=stage, num_microbatches=1,
                            zero3_prefetch=prefetch)
    optimizer = ShardedAdamW(buffer, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                             grad_clip=1.0)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        model(*batches[step]).backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    after_backward = optimizer.memory_after_backward
    return times, sum(after_backward[k] for k in ("params", "grads", "optimizer_state"))


def bench(args) -> dict:
    from nanomt.model import ModelConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=8,
                      seq_len=args.seq, vocab_size=256)
    generator = torch.Generator().manual_seed(dist.get_rank())
    batches = [(x, x) for x in torch.randint(0, 256, (args.steps, args.batch, args.seq),
                                              generator=generator)]
    results = {}
    for name, fn in (("ddp", lambda: run_peer("ddp", cfg, batches, args.steps)),
                     ("fsdp2", lambda: run_peer("fsdp2", cfg, batches, args.steps)),
                     ("nanomt_zero2", lambda: run_nanomt(2, cfg, batches, args.steps)),
                     ("nanomt_zero3", lambda: run_nanomt(3, cfg, batches, args.steps)),
                     ("zero3_sync", lambda: run_nanomt(3, cfg, batches, args.steps, 0))):
        dist.barrier()
        times, memory = fn()
        results[name] = (statistics.median(times[1:]), memory)  # step 0 warms up
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    from nanomt.testing import run_distributed

    per_rank = run_distributed(bench, world_size=args.world, args=(args,), timeout_s=1800,
                               collective_timeout_s=600)
    ddp_time, ddp_bytes = per_rank[0]["ddp"]
    print(f"GPT {args.layers} layers, h={args.hidden}, s={args.seq}, b={args.batch}/rank, "
          f"fp32, gloo CPU, {args.world} ranks (rank 0 shown)")
    print(f"{'contender':<14}{'step s':>9}{'time/DDP':>10}{'peak state MB':>15}{'mem/DDP':>9}")
    for name, (step_time, state_bytes) in per_rank[0].items():
        print(f"{name:<14}{step_time:>9.3f}{step_time / ddp_time:>10.2f}"
              f"{state_bytes / 2**20:>15.2f}{state_bytes / ddp_bytes:>9.2f}")


if __name__ == "__main__":
    main()
