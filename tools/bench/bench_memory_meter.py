"""Benchmark (not a test): what `train.measure_memory=true` costs the first step it watches.

    python tools/bench/bench_memory_meter.py [--repeats 3] [--layers 12] [--micro-batches 16]

Runs `python -m nanomt.train` for one step, meter off and on taking turns (one fresh process
each: the first step is the one the meter watches, with every first-use cost it brings), on the
embedded tiny model with more layers and micro-batches, and prints each pair's `step_time_s`
from metrics.jsonl and the median ratio on / off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def first_step_seconds(measure_memory: bool, layers: int, micro_batches: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        subprocess.run(
            [sys.executable, "-m", "nanomt.train", f"model.num_layers={layers}",
             f"train.global_batch_size={micro_batches}", "train.micro_batch_size=1",
             "train.steps=1", "train.sample=false", "train.eval_interval=0",
             "train.progress_bar=false", "checkpoint.interval=0",
             f"train.measure_memory={str(measure_memory).lower()}", f"hydra.run.dir={run_dir}"],
            cwd=ROOT, check=True, capture_output=True, env={**os.environ, "WANDB_MODE": "disabled"})
        record = json.loads((Path(run_dir) / "metrics.jsonl").read_text().splitlines()[0])
        return record["step_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--micro-batches", type=int, default=16)
    args = parser.parse_args()
    ratios = []
    for _ in range(args.repeats):
        off = first_step_seconds(False, args.layers, args.micro_batches)
        on = first_step_seconds(True, args.layers, args.micro_batches)
        ratios.append(on / off)
        print(f"first step: meter off {off:.3f} s, on {on:.3f} s, ratio {on / off:.2f}")
    print(f"median ratio on / off: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
