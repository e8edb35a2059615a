"""The training entry point end to end, single process: what the user sees in the run folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanomt.config import check_config
from nanomt.testing import compose_config
from nanomt.train import run

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.seq_len=64",
         "train.global_batch_size=16", "train.micro_batch_size=4", "optim.warmup_steps=5",
         "train.progress_bar=false", "logging.wandb.mode=disabled"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_run_writes_metrics_and_the_loss_falls(tmp_path):
    cfg = compose_config(SMALL + ["train.steps=40", "train.eval_interval=20",
                                  "optim.lr=3e-3", "optim.min_lr=3e-4"])
    summary = run(cfg, tmp_path)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 41))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "step_time_s"):
        assert key in metrics[0]
    assert metrics[-1]["tokens"] == 40 * 16 * 64
    assert [m["step"] for m in metrics if "val_loss" in m] == [20, 40]
    assert metrics[0]["loss"] > 5.0  # about ln(256) = 5.55 at init
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.5
    assert summary["final_loss"] == metrics[-1]["loss"]
    assert summary["val_loss"] == metrics[-1]["val_loss"]

    info = json.loads((tmp_path / "run.json").read_text())
    assert info["world_size"] == 1
    assert info["layout"]["tp"] == 1 and info["layout"]["dp"] == 1
    assert info["config"]["model"]["num_layers"] == 2
    (rank0,) = info["ranks"]
    assert (rank0["tp"], rank0["pp"], rank0["dp"]) == (0, 0, 0)
    assert rank0["num_parameters"] > 0 and rank0["host"]


def test_same_seed_gives_the_same_losses(tmp_path):
    overrides = SMALL + ["train.steps=3", "train.eval_interval=0"]
    run(compose_config(overrides), tmp_path / "a")
    run(compose_config(overrides), tmp_path / "b")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    assert [(m["loss"], m["grad_norm"]) for m in a] == [(m["loss"], m["grad_norm"]) for m in b]
    # and a different seed really changes them (the comparison above can see a difference)
    run(compose_config(overrides + ["train.seed=7"]), tmp_path / "c")
    c = read_metrics(tmp_path / "c")
    assert all(m["loss"] != n["loss"] for m, n in zip(a, c))


@pytest.mark.parametrize("overrides, error, match", [
    (["parallel.tp=3"], ValueError, "world size 1"),
    (["parallel.dp=2"], ValueError, "world size 1 != tp\\*cp\\*pp\\*dp"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], ValueError, "divisible"),
    (["train.precision=fp8"], ValueError, "train.precision"),
    (["parallel.zero_stage=5"], ValueError, "zero_stage"),
])
def test_bad_configs_fail_before_training(overrides, error, match):
    with pytest.raises(error, match=match):
        check_config(compose_config(overrides), world_size=1)


def test_tp_must_divide_the_heads():
    cfg = compose_config(["model.num_heads=4", "model.hidden_size=96", "parallel.tp=3"])
    with pytest.raises(ValueError, match="model.num_heads = 4 is not divisible by parallel.tp = 3"):
        check_config(cfg, world_size=3)


def test_command_line_entry_point_honours_run_dir_and_overrides(tmp_path):
    run_dir = tmp_path / "my_run"
    env = dict(os.environ, WANDB_MODE="disabled")
    result = subprocess.run(
        [sys.executable, "-m", "nanomt.train", "train.steps=2", "train.eval_interval=0",
         "model.num_layers=1", "model.seq_len=32", "train.global_batch_size=4",
         "train.micro_batch_size=2", "optim.lr=3e-4", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nanomt done:" in result.stdout
    info = json.loads((run_dir / "run.json").read_text())
    assert info["config"]["optim"]["lr"] == 3e-4
    assert len(read_metrics(run_dir)) == 2
    assert not (tmp_path / "outputs").exists()  # nothing written behind the user's back


def test_unknown_override_is_an_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nanomt.train", "train.stepz=2", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, WANDB_MODE="disabled"))
    assert result.returncode != 0
    assert "stepz" in result.stderr


def test_torchrun_ranks_share_one_run_folder(tmp_path):
    """Under torchrun every rank composes the config itself; rank 0 decides the run folder's
    timestamp and the others follow, so a launch writes exactly one folder."""
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "nanomt.train", "parallel.tp=2", "train.steps=2", "train.eval_interval=0",
         "model.num_layers=1", "model.seq_len=32", "train.global_batch_size=4",
         "train.micro_batch_size=2", "train.progress_bar=false", "checkpoint.interval=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = [p.parent for p in (tmp_path / "outputs").glob("*/*/run.json")]
    assert len(run_dirs) == 1, list((tmp_path / "outputs").rglob("*"))
    info = json.loads((run_dirs[0] / "run.json").read_text())
    assert info["world_size"] == 2 and info["layout"]["tp"] == 2
    assert sorted(r["tp"] for r in info["ranks"]) == [0, 1]
    assert len(read_metrics(run_dirs[0])) == 2
