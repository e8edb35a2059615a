"""Benchmark (not a test): every CPU comparison of nanomt against what users would run instead.

    python tools/bench/run_all.py [--repeats 5] [--out bench.json] [--only pipelines]

Each comparison runs both contenders in the same processes, alternating them `repeats` times
(pair by pair, so a load change on a shared machine hits both), and reports medians:

    single_vs_plain       nanomt.model.GPT + ShardedAdamW vs plain_gpt.PlainGPT + torch AdamW
                          (one process, one thread; forward, backward, clip, update)
    zero1/2_vs_ddp        GradientBuffer + ShardedAdamW at ZeRO-1/2 vs DistributedDataParallel
    zero1/2_overlap_vs_ddp  the same with parallel.overlap_param_gather
    zero3_vs_fsdp2        ZeRO-3 vs FSDP2 fully_shard (per layer), both with torch-free data
    tp2_vs_dtensor        nanomt at tp=2 vs PlainGPT under DTensor parallelize_module
                          (ColwiseParallel / RowwiseParallel), forward + backward
    1f1b_vs_torch         nanomt's 1F1B vs torch.distributed.pipelining Schedule1F1B (pp=2)
    interleaved_vs_torch  interleaved 1F1B (pp=2, v=2) vs ScheduleInterleaved1F1B, with the
                          measured bubbles next to (p-1)/(v*m)
    zb_h1_vs_torch        ZB-H1 (pp=2) vs ScheduleInterleavedZeroBubble, one stage per rank
                          (its ZB1P order), bubbles next to (p-1)/(3m)
    zbv_vs_torch          ZB-V (pp=2, chunks in a V, untied embeddings) vs ScheduleZBVZeroBubble,
                          bubbles next to nanomt's order's (p-1)/(6m)

and, per ZeRO stage, the bytes the dp group moved in one step (counted by the tests' wrapper
around nanomt.parallel.comm, tests/comm_counting.py, in ZeRO's accounting) next to the formula.
Prints a markdown table and writes bench.json. All on gloo CPU ranks; the peers are used here
only, nanomt never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent), str(ROOT / "tests")]

from bench_pipeline import bench_nanomt, bench_torch, micro_batches  # noqa: E402
from bench_zero import model_state_bytes, torch_optimizer_tensors  # noqa: E402
from comm_counting import traffic_log  # noqa: E402
from plain_gpt import PlainGPT, tensor_parallel_plan  # noqa: E402

from nanomt.model import GPT, ModelConfig  # noqa: E402
from nanomt.planner.schedule_costs import bubble_fraction  # noqa: E402
from nanomt.testing import run_distributed  # noqa: E402


def timed_steps(step, steps: int) -> float:
    """Median seconds of `steps` calls of step() after one warm-up call."""
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def alternate(contenders: dict, repeats: int, steps: int, sync=lambda: None) -> dict:
    """{name: median over repeats of each round's median step}, contenders taking turns."""
    rounds = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, step in contenders.items():
            sync()
            rounds[name].append(timed_steps(step, steps))
    return {name: statistics.median(values) for name, values in rounds.items()}


def nanomt_trainer(model, grid, stage: int, **buffer_options):
    from nanomt.optim import ShardedAdamW
    from nanomt.parallel.data_parallel import GradientBuffer

    buffer = GradientBuffer([model], grid, zero_stage=stage, num_microbatches=1,
                            **buffer_options)
    return ShardedAdamW(buffer, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01,
                        grad_clip=1.0)


def nanomt_step(model, optimizer, batch):
    def step():
        optimizer.zero_grad()
        model(*batch).backward()
        optimizer.step()
    return step


def torch_step(model, optimizer, batch):
    def step():
        optimizer.zero_grad(set_to_none=True)
        model(*batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step


# ---- single process ---------------------------------------------------------------------------
def single_vs_plain(args) -> dict:
    torch.set_num_threads(1)
    cfg = ModelConfig(num_layers=4, hidden_size=256, num_heads=8, seq_len=256)
    batch = (torch.randint(0, 256, (8, 256)),) * 2
    ours = GPT(cfg, None, seed=1)
    plain = PlainGPT(cfg)
    assert sum(p.numel() for p in plain.parameters()) == ours.num_local_parameters()
    contenders = {"nanomt": nanomt_step(ours, nanomt_trainer(ours, None, 0), batch),
                  "plain": torch_step(plain, torch.optim.AdamW(plain.parameters(), lr=1e-3),
                                      batch)}
    return alternate(contenders, args.repeats, args.steps)


# ---- data parallel (dp=2) ---------------------------------------------------------------------
DP_CFG = dict(num_layers=4, hidden_size=128, num_heads=8, seq_len=128)


def data_parallel(args) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from nanomt.parallel.grid import ParallelGrid

    cfg = ModelConfig(**DP_CFG)
    grid = ParallelGrid(1, 1, dist.get_world_size())
    batch = (torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(grid.rank)),) * 2
    contenders, peak, optimizers = {}, {}, {}
    ddp_model = DistributedDataParallel(GPT(cfg, None, seed=1))
    ddp_opt = torch.optim.AdamW(ddp_model.parameters(), lr=1e-3)
    contenders["ddp"] = torch_step(ddp_model, ddp_opt, batch)
    fsdp_model = GPT(cfg, None, seed=1)
    for layer in fsdp_model.layers:
        fully_shard(layer)
    fully_shard(fsdp_model)
    fsdp_opt = torch.optim.AdamW(fsdp_model.parameters(), lr=1e-3)
    contenders["fsdp2"] = torch_step(fsdp_model, fsdp_opt, batch)
    for stage in (1, 2, 3):
        model = GPT(cfg, grid, seed=1)
        optimizers[stage] = nanomt_trainer(model, grid, stage)
        contenders[f"zero{stage}"] = nanomt_step(model, optimizers[stage], batch)
    for stage in (1, 2):  # parallel.overlap_param_gather
        model = GPT(cfg, grid, seed=1)
        opt = nanomt_trainer(model, grid, stage, overlap_param_gather=True)
        contenders[f"zero{stage}_overlap"] = nanomt_step(model, opt, batch)
    times = alternate(contenders, args.repeats, args.steps, sync=dist.barrier)
    for name, model, opt in (("ddp", ddp_model, ddp_opt), ("fsdp2", fsdp_model, fsdp_opt)):
        opt.zero_grad(set_to_none=True)
        model(*batch).backward()
        peak[name] = model_state_bytes(list(model.parameters()), torch_optimizer_tensors(opt))
    for stage, opt in optimizers.items():
        peak[f"zero{stage}"] = sum(opt.memory_after_backward[k]
                                   for k in ("params", "grads", "optimizer_state"))
    traffic = {}
    for stage in (0, 1, 2, 3):
        model = GPT(cfg, grid, seed=1)
        opt = nanomt_trainer(model, grid, stage)
        with traffic_log() as log:
            nanomt_step(model, opt, batch)()
        psi = 4 * sum(b.padded_numel for b in opt.buckets)
        traffic[stage] = {"counted_bytes": sum(t.volume_bytes for t in log if t.group == "dp"),
                          "formula_bytes": {0: 2, 1: 2, 2: 2, 3: 3}[stage] * psi + 16}
    return {"times": times, "peak_bytes": peak, "traffic": traffic}


# ---- tensor parallel (tp=2) -------------------------------------------------------------------
def tensor_parallel(args) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from nanomt.parallel.grid import ParallelGrid

    cfg = ModelConfig(num_layers=4, hidden_size=256, num_heads=8, seq_len=128)
    batch = (torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0)),) * 2
    ours = GPT(cfg, ParallelGrid(2, 1, 1), seed=1)
    plain = PlainGPT(cfg)
    theirs = parallelize_module(plain, init_device_mesh("cpu", (2,)), tensor_parallel_plan(plain))

    def fwd_bwd(model):
        def step():
            model.zero_grad(set_to_none=True)
            model(*batch).backward()
        return step
    return alternate({"nanomt": fwd_bwd(ours), "dtensor": fwd_bwd(theirs)}, args.repeats,
                     args.steps, sync=dist.barrier)


# ---- pipeline parallel (pp=2, m=8) ------------------------------------------------------------
PIPELINE_PAIRS = {  # name: (nanomt's parallel.schedule, chunks per rank); torch's: bench_pipeline
    "1f1b_vs_torch": ("1f1b", 1),
    "interleaved_vs_torch": ("1f1b", 2),
    "zb_h1_vs_torch": ("zb_h1", 1),
    "zbv_vs_torch": ("zbv", 2),
}


def pipelines(args) -> dict:
    from nanomt.parallel.grid import ParallelGrid

    cfg = ModelConfig(num_layers=4, hidden_size=128, num_heads=4, seq_len=128)
    grid = ParallelGrid(tp=1, pp=2, dp=1)
    batches = micro_batches(cfg, 8, 4)
    out = {}
    for key, (schedule, v) in PIPELINE_PAIRS.items():
        model = replace(cfg, tie_embeddings=False) if schedule == "zbv" else cfg  # zbv's rule
        rounds = {"nanomt": [], "torch": []}
        for _ in range(args.repeats):
            rounds["nanomt"].append(bench_nanomt(model, grid, v, batches, args.steps, schedule))
            rounds["torch"].append(bench_torch(model, grid, v, batches, args.steps, schedule))
        out[key] = {name: (statistics.median(t for t, _ in r),
                           statistics.median(b for _, b in r)) for name, r in rounds.items()}
    return out


# ---- report -----------------------------------------------------------------------------------
def pair(ours: float, theirs: float, **extra) -> dict:
    return {"nanomt_s": ours, "peer_s": theirs, "ratio": ours / theirs, **extra}


def collect(args) -> dict:
    """Every comparison, or only the group --only names (single, dp, tp, pipelines)."""
    bench, run = {}, (lambda group: args.only in (None, group))
    if run("single"):
        single = single_vs_plain(args)
        bench["single_vs_plain"] = pair(single["nanomt"], single["plain"])
    if run("dp"):
        dp = run_distributed(data_parallel, 2, args=(args,), timeout_s=900,
                             collective_timeout_s=600)[0]
        t, mem = dp["times"], dp["peak_bytes"]
        for ours, peer in (("zero1", "ddp"), ("zero2", "ddp"), ("zero3", "fsdp2")):
            bench[f"{ours}_vs_{peer}"] = pair(t[ours], t[peer], nanomt_peak_bytes=mem[ours],
                                              peer_peak_bytes=mem[peer])
        for ours in ("zero1_overlap", "zero2_overlap"):
            bench[f"{ours}_vs_ddp"] = pair(t[ours], t["ddp"])
    if run("tp"):
        tp = run_distributed(tensor_parallel, 2, args=(args,), timeout_s=900,
                             collective_timeout_s=600)[0]
        bench["tp2_vs_dtensor"] = pair(tp["nanomt"], tp["dtensor"])
    if run("pipelines"):
        pp = run_distributed(pipelines, 2, args=(args,), timeout_s=1800,
                             collective_timeout_s=600)[0]
        for key, (schedule, v) in PIPELINE_PAIRS.items():
            (ours, our_bubble), (theirs, their_bubble) = pp[key]["nanomt"], pp[key]["torch"]
            bench[key] = pair(ours, theirs, nanomt_bubble=our_bubble, peer_bubble=their_bubble,
                              formula_bubble=bubble_fraction(schedule, 2, 8, v))
    if run("dp"):
        bench["zero_traffic"] = {f"stage{s}": r for s, r in dp["traffic"].items()}
    return bench


def machine() -> dict:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def table(bench: dict) -> str:
    lines = ["| comparison | nanomt (s) | peer (s) | ratio | notes |", "|---|---|---|---|---|"]
    for key, r in bench.items():
        if key in ("zero_traffic", "machine"):
            continue
        notes = ""
        if "nanomt_peak_bytes" in r:
            notes = f"peak state {r['nanomt_peak_bytes'] / 2**20:.2f} vs {r['peer_peak_bytes'] / 2**20:.2f} MB"
        if "formula_bubble" in r:
            notes = (f"bubble {r['nanomt_bubble']:.3f} vs {r['peer_bubble']:.3f} "
                     f"(formula {r['formula_bubble']:.3f})")
        lines.append(f"| {key} | {r['nanomt_s']:.4f} | {r['peer_s']:.4f} | {r['ratio']:.2f} | {notes} |")
    if "zero_traffic" not in bench:
        return "\n".join(lines)
    lines += ["", "| ZeRO stage | counted bytes/step/rank | formula |", "|---|---|---|"]
    for stage, r in bench["zero_traffic"].items():
        lines.append(f"| {stage} | {r['counted_bytes']:,} | {r['formula_bytes']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--only", choices=("single", "dp", "tp", "pipelines"),
                        help="run one group of comparisons")
    args = parser.parse_args()
    start = machine()
    bench = collect(args)
    bench["machine"] = {**start, "load_average_after": machine()["load_average"]}
    Path(args.out).write_text(json.dumps(bench, indent=2, default=str) + "\n")
    print(f"{start['date']}, commit {start['commit']}, {start['cpus']} CPUs, torch "
          f"{start['torch']}, load {start['load_average']} -> {bench['machine']['load_average_after']}")
    print(table(bench))


if __name__ == "__main__":
    main()
