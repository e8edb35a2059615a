"""Planned bytes per rank against the memory meter, for seven layouts of one small model on
8 gloo ranks (one spawn, one step each): tp x pp x dp at ZeRO-1 and ZeRO-3, interleaved
stages, GPipe over four stages, full recompute at ZeRO-2, dp=4 with selective recompute, and
the llama style (RMSNorm, RoPE, SwiGLU) at tp x pp x dp with sequence parallelism.
Every rank writes `memory_per_rank` to summary.json (model state after backward from the
optimizer's own buffers, peak activations from `PeakMemoryMeter`); the plan of the same config
must be within 10% of the largest rank's, term by term and in total.

s b >> h, as in tests/test_activation_memory.py: the copies of the weights the CPU's matmuls
make (what the formulas leave out) stay small beside the activations. The one layout known to
miss, full recompute under sequence parallelism at tp=4 (the meter finds 7-18% more than the
plan, varying from run to run), is in docs/planner.md, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanomt.planner import make_plan
from nanomt.testing import compose_config, run_distributed

SMALL = ["model.num_layers=4", "model.hidden_size=32", "model.seq_len=256",
         "train.global_batch_size=16", "train.micro_batch_size=4", "train.steps=1",
         "train.eval_interval=0", "train.eval_batches=1", "train.progress_bar=false",
         "checkpoint.interval=0", "logging.wandb.mode=disabled", "train.measure_memory=true"]
LAYOUTS = {  # name: overrides (8 ranks each)
    "tp2 pp2 dp2 zero1": ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"],
    "tp2 pp2 dp2 zero3": ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=3"],
    "tp2 pp2 v2 dp2 interleaved": ["parallel.tp=2", "parallel.pp=2", "parallel.virtual_stages=2",
                                   "parallel.zero_stage=1", "train.micro_batch_size=2"],
    "pp4 dp2 gpipe": ["parallel.pp=4", "parallel.schedule=gpipe", "train.micro_batch_size=2"],
    "tp2 pp2 dp2 zero2 full recompute": ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=2",
                                         "train.activation_checkpointing=full"],
    "tp2 dp4 selective recompute": ["parallel.tp=2", "train.activation_checkpointing=selective",
                                    "train.micro_batch_size=2"],
    "llama tp2 pp2 dp2 sp zero1": ["model.style=llama", "parallel.tp=2", "parallel.pp=2",
                                   "parallel.sequence_parallel=true", "parallel.zero_stage=1"],
}


def _train_layouts(run_dir: str) -> None:
    from nanomt.train import run

    for name, overrides in LAYOUTS.items():
        run(compose_config(SMALL + overrides), Path(run_dir) / name.replace(" ", "_"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("planner_layouts")
    run_distributed(_train_layouts, world_size=8, args=(str(run_dir),), timeout_s=900)
    return run_dir


def measured_bytes(run_dir: Path) -> dict[str, float]:
    ranks = json.loads((run_dir / "summary.json").read_text())["memory_per_rank"]
    assert len(ranks) == 8
    out = {kind: max(r["after_backward"][key] for r in ranks)
           for kind, key in (("weights", "params"), ("grads", "grads"),
                             ("optimizer", "optimizer_state"))}
    out["activations"] = max(r["peak_activations"] for r in ranks)
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planned_bytes_match_the_meter(runs, name):
    from nanomt.planner.from_config import plan_inputs

    cfg = compose_config(SMALL + LAYOUTS[name] + ["+plan=default"])
    cfg.parallel.dp = 8 // (cfg.parallel.tp * cfg.parallel.pp)
    plan = make_plan(*plan_inputs(cfg))
    measured = measured_bytes(runs / name.replace(" ", "_"))
    planned = dict(plan.bytes_per_gpu)
    planned["activations"] += planned.pop("zero3_gathered")  # the meter sees them as storages
    for kind, value in measured.items():
        assert planned[kind] == pytest.approx(value, rel=0.1), (kind, planned, measured)
    assert sum(planned.values()) == pytest.approx(sum(measured.values()), rel=0.1)
