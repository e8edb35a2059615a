"""Benchmark (not a test): expert parallelism on gloo CPU ranks, at equal tokens.

    python tools/bench/bench_moe.py [--world 2] [--repeats 3] [--steps 3] [--out moe.json]

Three contenders train on the same `world` ranks (dp = world), each rank the same micro-batch of
b sequences of s tokens per step, with nanomt's step (forward, backward, the data-parallel
gradient reduction of nanomt.parallel.data_parallel at ZeRO-1, AdamW):

    moe_ep1   a llama-style model whose every MLP is E experts of width f_e, top-k routing;
              every rank holds all E experts
    moe_ep2   the same model with the experts split over ep = 2 ranks: the tokens travel to
              their experts' rank and back by all-to-all (nanomt.parallel.expert_parallel)
    dense     the same model with one dense MLP of width E f_e per layer: the same total
              parameters but the routers' E h, and E / k times the MLP FLOPs per token

The contenders take turns `repeats` times (a load change on a shared machine hits all three),
each timing `steps` steps after one warm-up step; medians are reported, with the ratios to
moe_ep1. Then one step of moe_ep2 runs inside tests/comm_counting.py's traffic log: the
all-to-all bytes every rank handed to comm, summed over the ranks, next to the planner's count
(nanomt.planner.estimate.all_to_all_bytes_per_step, the ep group's mean per rank) x world.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent), str(ROOT / "tests")]

from nanomt.model import GPT, ModelConfig  # noqa: E402
from nanomt.model.config import MoEConfig  # noqa: E402
from nanomt.testing import run_distributed  # noqa: E402

EXPERTS, TOP_K, EXPERT_FFN = 4, 2, 256
MOE = ModelConfig(style="llama", num_layers=4, hidden_size=128, num_heads=4, seq_len=128,
                  vocab_size=256, ffn_hidden_size=EXPERT_FFN,
                  moe=MoEConfig(num_experts=EXPERTS, top_k=TOP_K, ffn_hidden_size=EXPERT_FFN,
                                aux_loss_coef=0.01))
DENSE = replace(MOE, moe=None, ffn_hidden_size=EXPERTS * EXPERT_FFN)
MICRO_BATCH = 4


def contender(cfg: ModelConfig, ep: int, batch: tuple[torch.Tensor, torch.Tensor]):
    """One training step of `cfg` on this rank's batch, at ep over dp = world ranks."""
    from nanomt.model.moe import set_aux_loss_scale
    from nanomt.optim import ShardedAdamW
    from nanomt.parallel.data_parallel import GradientBuffer
    from nanomt.parallel.grid import ParallelGrid

    grid = ParallelGrid(dp=dist.get_world_size(), ep=ep)
    model = GPT(cfg, grid, seed=1)
    buffer = GradientBuffer([model], grid, zero_stage=1, num_microbatches=1)
    optimizer = ShardedAdamW(buffer, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01,
                             grad_clip=1.0)
    set_aux_loss_scale([model], 1.0)

    def step() -> None:
        optimizer.zero_grad()
        model(*batch).backward()
        optimizer.step()
    return step


def timed(step, steps: int) -> float:
    """Median seconds of `steps` steps after a warm-up one (the ranks start together)."""
    step()
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bench(repeats: int, steps: int) -> dict:
    from comm_counting import traffic_log

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, 256, (MICRO_BATCH, MOE.seq_len), generator=generator)
    batch = (tokens, tokens)
    steps_of = {"moe_ep1": contender(MOE, 1, batch), "moe_ep2": contender(MOE, 2, batch),
                "dense": contender(DENSE, 1, batch)}
    rounds = {name: [] for name in steps_of}
    for _ in range(repeats):
        for name, step in steps_of.items():
            rounds[name].append(timed(step, steps))
    with traffic_log() as log:
        steps_of["moe_ep2"]()
    return {"step_s": {name: statistics.median(r) for name, r in rounds.items()},
            "all_to_all_bytes": sum(r.nbytes for r in log if r.kind == "all_to_all")}


def planned_all_to_all_bytes(world: int) -> float:
    from nanomt.planner import PlanInputs, make_plan

    x = PlanInputs(tp=1, pp=1, dp=world, ep=2, micro_batch=MICRO_BATCH,
                   global_batch=MICRO_BATCH * world, precision="fp32")
    return make_plan(MOE, x).all_to_all_bytes_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (dp); ep = 2 divides it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    ranks = run_distributed(_bench, args.world, args=(args.repeats, args.steps), timeout_s=1800,
                            collective_timeout_s=600)
    times = ranks[0]["step_s"]
    counted = sum(r["all_to_all_bytes"] for r in ranks)
    planned = args.world * planned_all_to_all_bytes(args.world)
    result = {"world": args.world, "tokens_per_step": args.world * MICRO_BATCH * MOE.seq_len,
              "params": {"moe": MOE.num_parameters(), "moe_active": MOE.num_parameters(True),
                         "dense": DENSE.num_parameters()},
              "step_s": times, "ratio_to_moe_ep1": {k: v / times["moe_ep1"]
                                                    for k, v in times.items()},
              "all_to_all_bytes_per_step": {"counted": counted, "planned": planned}}
    print(f"{args.world} gloo ranks, {result['tokens_per_step']} tokens per step, parameters "
          f"{result['params']}")
    print("| contender | step (s) | ratio to moe_ep1 |\n|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.4f} | {result['ratio_to_moe_ep1'][name]:.2f} |")
    print(f"all-to-all bytes per step, all ranks: counted {counted:,}, planned {planned:,.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
