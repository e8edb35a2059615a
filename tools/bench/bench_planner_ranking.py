"""Benchmark (not a test): does the planner's step-time model rank layouts as this machine does?

    python tools/plan.py --calibrate model=tiny plan.gpus=4 plan.machine_file=machine.json \
        train.micro_batch_size=4
    python tools/bench/bench_planner_ranking.py --machine machine.json [--steps 5] [--rounds 2]

Trains one small GPT (fp32) for a few steps in each of eight layouts of 4 gloo ranks (one spawn
for all, after a warm-up run), mixing tp, pp, interleaved stages, GPipe, dp, ZeRO 0/3, sequence
parallelism and recompute, `rounds` times over; takes the median step time of the steps after
the first from each run's metrics.jsonl (the fastest round: the host is shared), predicts each with nanomt.planner.step_time on the calibrated machine, and prints
both with Kendall's tau between the two rankings (docs/planner.md keeps the table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

WORLD = 4
MODEL = ["model=tiny", "model.num_layers=4", "model.hidden_size=128", "model.seq_len=128",
         "train.global_batch_size=32", "train.micro_batch_size=4", "train.eval_interval=0",
         "train.eval_batches=1", "train.progress_bar=false", "checkpoint.interval=0",
         "logging.wandb.mode=disabled"]
LAYOUTS = {
    "dp4": [],
    "dp4 zero3": ["parallel.zero_stage=3"],
    "tp2 dp2": ["parallel.tp=2"],
    "pp2 dp2": ["parallel.pp=2"],
    "pp2 v2 dp2": ["parallel.pp=2", "parallel.virtual_stages=2"],
    "tp2 pp2 full": ["parallel.tp=2", "parallel.pp=2", "train.activation_checkpointing=full"],
    "tp4 sp selective": ["parallel.tp=4", "parallel.sequence_parallel=true",
                         "train.activation_checkpointing=selective"],
    "pp4 gpipe": ["parallel.pp=4", "parallel.schedule=gpipe"],
}


def _train_all(run_dir: str, steps: int, rounds: int) -> None:
    """A warm-up run (the first run of a process pays one-time costs), then every layout,
    `rounds` times over."""
    from nanomt.testing import compose_config
    from nanomt.train import run

    run(compose_config(MODEL + ["train.steps=2"]), Path(run_dir) / "warm-up")
    for round_ in range(rounds):
        for name, overrides in LAYOUTS.items():
            run(compose_config(MODEL + overrides + [f"train.steps={steps}"]),
                Path(run_dir) / f"{name.replace(' ', '_')}.{round_}")


def measured_step_s(run_dir: Path, name: str, rounds: int) -> float:
    """The fastest round's median step time, the first step of each run left out."""
    medians = []
    for round_ in range(rounds):
        metrics = run_dir / f"{name.replace(' ', '_')}.{round_}" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        times = [r["step_time_s"] for r in records if "step_time_s" in r]
        medians.append(statistics.median(times[1:] or times))
    return min(medians)


def predicted_step_s(overrides: list[str], machine_path: str) -> float:
    from nanomt.planner import make_plan
    from nanomt.planner.from_config import machine, plan_inputs
    from nanomt.planner.step_time import step_time
    from nanomt.testing import compose_config

    cfg = compose_config(MODEL + overrides + ["+plan=default", f"plan.machine_file={machine_path}"])
    p = cfg.parallel
    cfg.parallel.dp = WORLD // (p.tp * p.pp * p.cp)
    model, x = plan_inputs(cfg)
    plan = make_plan(model, x)
    return step_time(model, x, plan.params_per_rank, plan.hardware_flops_per_iteration,
                     plan.model_flops_per_iteration, machine(cfg)).total


def kendall_tau(a: list[float], b: list[float]) -> float:
    """(concordant - discordant) pairs over all pairs (no ties expected)."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    sign = [((a[i] - a[j]) * (b[i] - b[j]) > 0) - ((a[i] - a[j]) * (b[i] - b[j]) < 0)
            for i, j in pairs]
    return sum(sign) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--machine", required=True, help="the file of tools/plan.py --calibrate")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from nanomt.testing import run_distributed

    with tempfile.TemporaryDirectory() as run_dir:
        run_distributed(_train_all, world_size=WORLD, args=(run_dir, args.steps, args.rounds),
                        timeout_s=1800)
        measured = [measured_step_s(Path(run_dir), n, args.rounds) for n in LAYOUTS]
    predicted = [predicted_step_s(o, args.machine) for o in LAYOUTS.values()]
    rank = {n: i + 1 for i, n in enumerate(sorted(LAYOUTS, key=lambda n: measured[
        list(LAYOUTS).index(n)]))}
    print("| layout (4 ranks) | predicted s | measured s | measured rank |")
    print("|---|---|---|---|")
    for name, p, m in sorted(zip(LAYOUTS, predicted, measured), key=lambda r: r[1]):
        print(f"| {name} | {p:.3f} | {m:.3f} | {rank[name]} |")
    print(f"Kendall tau {kendall_tau(predicted, measured):.2f}")


if __name__ == "__main__":
    main()
