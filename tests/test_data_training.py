"""Training on the indexed path with a batch-size ramp-up: metrics, resume, layouts, data reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanomt.testing import compose_config, run_distributed
from nanomt.train import run

# 4 layers so that pp=4 has two middle stages; ramp [4, 4, 24] up to 16 (hand table below)
RAMP = ["model.num_layers=4", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=32",
        "train.global_batch_size=16", "train.micro_batch_size=1",
        "train.rampup_batch_size=[4,4,24]", "train.steps=6", "train.eval_interval=0",
        "train.eval_batches=1", "optim.warmup_steps=2", "optim.schedule_unit=samples",
        "optim.decay_steps=60", "train.progress_bar=false", "logging.wandb.mode=disabled"]
# consumed before the step 0, 4, 8, 16, 28, 44 -> B = 4, 4 (4 / 8 samples per increment
# rounds down), 8, 12, 16 (28 > 24), 16
SIZES = [4, 4, 8, 12, 16, 16]
CONSUMED = [4, 8, 16, 28, 44, 60]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("single")
    run(compose_config(RAMP), run_dir)
    return metrics(run_dir)


def test_ramped_run_logs_batch_sizes_and_consumed_samples(single):
    assert [m["global_batch_size"] for m in single] == SIZES
    assert [m["consumed_samples"] for m in single] == CONSUMED
    assert [m["tokens"] for m in single] == [c * 32 for c in CONSUMED]
    # lr counted in samples: warm-up over 2 samples, cosine decay over 60 (optim.schedule_unit)
    assert single[0]["lr"] == pytest.approx(1e-3 * 1 / 2)
    assert single[1]["lr"] < single[0]["lr"] * 2  # already decaying at sample 4


def test_resume_mid_ramp_is_bit_exact_and_other_micro_batch_continues_the_stream(
        single, tmp_path):
    split = tmp_path / "split"
    run(compose_config(RAMP + ["train.exit_after=3", "checkpoint.interval=0"]), split)
    run(compose_config(RAMP + ["train.resume=auto"]), split)
    assert [m["loss"] for m in metrics(split)] == [m["loss"] for m in single]
    other = tmp_path / "other"
    run(compose_config(RAMP + ["train.exit_after=3", "checkpoint.interval=0"]), other)
    run(compose_config(RAMP + ["train.resume=auto", "train.micro_batch_size=2"]), other)
    resumed = metrics(other)
    assert [m["consumed_samples"] for m in resumed] == CONSUMED
    for got, want in zip(resumed, single):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def _layouts_with_reads(base: str) -> dict:
    """On 4 ranks: the ramped run under dp=2 x pp=2, then under pp=4 counting each rank's
    micro-batch reads."""
    from nanomt.data.sampler import GlobalBatchSampler
    from nanomt.parallel import comm

    reads = {"n": 0}
    original = GlobalBatchSampler.micro_batch

    def counting(self, *args, **kwargs):
        reads["n"] += 1
        return original(self, *args, **kwargs)
    GlobalBatchSampler.micro_batch = counting
    base_dir = Path(base)
    run(compose_config(RAMP + ["parallel.pp=2", "parallel.dp=2"]), base_dir / "dp2pp2")
    reads["n"] = 0
    run(compose_config(RAMP + ["parallel.pp=4"]), base_dir / "pp4")
    return {"rank": comm.world_rank(), "reads": reads["n"]}


def test_ramped_layouts_match_single_process_and_only_end_stages_read(single, tmp_path):
    results = run_distributed(_layouts_with_reads, 4, args=(str(tmp_path),), timeout_s=400)
    for name in ("dp2pp2", "pp4"):
        got = metrics(tmp_path / name)
        assert [m["global_batch_size"] for m in got] == SIZES
        for g, want in zip(got, single):
            assert g["loss"] == pytest.approx(want["loss"], rel=1e-5)
    ranks = json.loads((tmp_path / "pp4" / "run.json").read_text())["ranks"]
    stage = {r["rank"]: r["pp"] for r in ranks}
    reads = {stage[r["rank"]]: r["reads"] for r in results}
    micro_batches = sum(SIZES)  # micro_batch_size 1, dp 1: one micro-batch per sample
    assert reads == {0: micro_batches, 1: 0, 2: 0, 3: micro_batches}
