"""Failures inside one launch, in-process or on spawned gloo ranks: a failed save keeps the
previous checkpoint `latest` and loadable, a non-finite loss stops every rank without saving, the
checkpoint folder must be writable and shared, rank 0 picks the resume checkpoint and every rank
must be able to read it. Faults come from NANOMT_FAULT (nanomt.faults)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanomt.checkpoint.format import CheckpointError
from nanomt.checkpoint.load import resolve_checkpoint
from nanomt.errors import CheckpointWriteError, ConfigError, ExitCode, NonFiniteError
from nanomt.faults import Fault, parse_faults
from nanomt.testing import compose_config, run_distributed
from nanomt.train import main, run

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=32",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_interval=0",
        "train.progress_bar=false", "train.measure_memory=false", "logging.wandb.mode=disabled"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fault_spec_parses_and_rejects_typos():
    assert parse_faults("kill:rank=1,step=7; fail:step=6,at=save") == (
        Fault("kill", rank=1, step=7), Fault("fail", rank=0, step=6, at="save"))
    with pytest.raises(ValueError, match="unknown kind"):
        parse_faults("explode:rank=1")
    with pytest.raises(ValueError, match="at="):
        parse_faults("kill:at=forward")


def test_fault_injection_is_read_in_one_place():
    """NANOMT_FAULT is read by nanomt.faults.inject alone; the rest of nanomt calls inject."""
    package = Path(__file__).resolve().parent.parent / "nanomt"
    readers = {str(f.relative_to(package)): f.read_text().count('environ.get("NANOMT_FAULT")')
               for f in package.rglob("*.py") if "NANOMT_FAULT" in f.read_text()}
    assert readers == {"faults.py": 1}


def test_failed_save_keeps_the_previous_checkpoint_latest_and_loadable(tmp_path, monkeypatch):
    steps = ["train.steps=8", "checkpoint.interval=3"]
    monkeypatch.setenv("NANOMT_FAULT", "fail:rank=0,step=6,at=save")
    with pytest.raises(CheckpointWriteError, match="step_00000003 is still `latest`") as failed:
        run(compose_config(TINY + steps), tmp_path / "run")
    assert "No space left on device" in str(failed.value)
    assert failed.value.exit_code == ExitCode.CHECKPOINT_WRITE
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003"]  # no .tmp left
    assert resolve_checkpoint(root).name == "step_00000003"

    # the previous checkpoint loads, and the resumed run equals one that never failed
    monkeypatch.delenv("NANOMT_FAULT")
    run(compose_config(TINY + steps + ["train.resume=auto"]), tmp_path / "run")
    run(compose_config(TINY + steps), tmp_path / "clean")
    assert losses(tmp_path / "run") == losses(tmp_path / "clean")


def test_on_error_continue_retries_at_the_next_interval(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOMT_FAULT", "fail:rank=0,step=3,at=save")
    cfg = compose_config(TINY + ["train.steps=8", "checkpoint.interval=3",
                                 "checkpoint.on_error=continue", "checkpoint.keep_last=0"])
    summary = run(cfg, tmp_path)
    assert summary["steps"] == 8
    assert "nanomt: warning: could not write checkpoint step_00000003" in capsys.readouterr().out
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert saved == ["step_00000006", "step_00000008"]


def save_fails_on_rank1(overrides: list[str], run_dir: str) -> str:
    import os

    os.environ["NANOMT_FAULT"] = "fail:rank=1,step=4,at=save"
    try:
        run(compose_config(overrides), Path(run_dir))
    except CheckpointWriteError as error:
        return str(error)
    return "no error"


def test_a_write_failure_on_one_rank_fails_the_save_on_every_rank(tmp_path):
    overrides = TINY + ["train.steps=6", "checkpoint.interval=2", "parallel.zero_stage=1"]
    messages = run_distributed(save_fails_on_rank1, 2, args=(overrides, str(tmp_path)))
    for message in messages:
        assert "could not write checkpoint step_00000004" in message
        assert "rank 1: [Errno 28] No space left on device" in message
        assert "step_00000002 is still `latest`" in message
    assert resolve_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_non_finite_loss_stops_without_saving_the_bad_state(tmp_path):
    # lr 1e30 with no warm-up: the first update makes the weights ~1e30 and step 2's loss inf/nan
    explode = ["optim.lr=1e30", "optim.min_lr=0", "optim.warmup_steps=0",
               "train.steps=6", "checkpoint.interval=1"]
    with pytest.raises(NonFiniteError, match=r"step 2: loss .* not finite") as stopped:
        run(compose_config(TINY + explode), tmp_path / "a")
    assert "step_00000001" in str(stopped.value) and "train.max_skipped_steps" in str(stopped.value)
    root = tmp_path / "a" / "checkpoints"
    assert resolve_checkpoint(root).name == "step_00000001"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000001"]

    # allowing skips lets the run go on skipping (the optimizer does not apply them)
    with pytest.raises(NonFiniteError, match="step 4:"):
        run(compose_config(TINY + explode + ["train.max_skipped_steps=2"]), tmp_path / "b")
    rows = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, True, True, True]


def test_unwritable_checkpoint_folder_is_one_line_and_exit_code_2(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exited:
        main(TINY + ["train.steps=1", f"checkpoint.dir={blocker}/ckpt",
                     f"hydra.run.dir={tmp_path}/run"])
    assert exited.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nanomt: error: checkpoint folder ")
    assert "is not writable" in lines[0] and "checkpoint.dir" in lines[0]


def probe_with_own_folders(overrides: list[str], root: str) -> str:
    import torch.distributed as dist

    rank = dist.get_rank()
    cfg = compose_config(overrides + [f"checkpoint.dir={root}/node{rank}"])
    try:
        run(cfg, Path(root) / "run")
    except ConfigError as error:
        return error.exit_code, str(error)
    return 0, "no error"


def test_unshared_checkpoint_folder_fails_every_rank_at_start_up(tmp_path):
    """Each rank looks in a folder only it sees: as two nodes without a shared file system."""
    messages = run_distributed(probe_with_own_folders, 2,
                               args=(TINY + ["train.steps=2"], str(tmp_path)))
    for exit_code, message in messages:
        assert exit_code == ExitCode.BAD_INPUT == 2
        assert "rank 1 on " in message and "cannot see the probe file" in message
        assert "not on a file system shared by every node" in message
        assert "checkpoint.dir" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def resume_where_rank1_cannot_read(overrides: list[str], run_dir: str) -> tuple:
    import torch.distributed as dist

    from nanomt.checkpoint import checkpointer

    run(compose_config(overrides + ["train.steps=2"]), Path(run_dir))  # saves step 2
    if dist.get_rank() == 1:  # a stale network-file-system view on rank 1's node
        checkpointer._cannot_read = lambda folder: "rank 1 on node-b cannot read it (stale)"
    try:
        run(compose_config(overrides + ["train.steps=4", "train.resume=auto"]), Path(run_dir))
    except CheckpointError as error:
        return "error", str(error)
    return "ok", ""


def test_rank0_chooses_the_resume_checkpoint_and_every_rank_must_read_it(tmp_path):
    overrides = TINY + ["checkpoint.interval=2"]
    results = run_distributed(resume_where_rank1_cannot_read, 2, args=(overrides, str(tmp_path)))
    for status, message in results:
        assert status == "error"
        assert "rank 0 resumes from" in message and "step_00000002" in message
        assert "rank 1 on node-b cannot read it" in message


def test_configured_preemption_signal_saves_and_exits_with_code_3(tmp_path):
    """Two ranks started by hand (so each one's exit code is seen; torchrun's own code is 1 after
    a forwarded signal), SIGUSR1 as SLURM's --signal=USR1 would send it, to rank 1 only: both
    ranks learn it, save one checkpoint together and exit with code 3."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from nanomt.testing import free_port

    cmd = [sys.executable, "-m", "nanomt.train", *TINY, "train.steps=2000",
           "checkpoint.interval=0", "train.preempt_signal=SIGUSR1", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "NANOMT_RUN_STAMP": "preempt-test"}
    env.pop("NANOMT_FAULT", None)
    ranks = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "metrics.jsonl").exists()
                   and (tmp_path / "metrics.jsonl").read_text().count("\n") >= 2):
            assert all(r.poll() is None for r in ranks) and time.monotonic() < deadline
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGUSR1)
        outputs = [rank.communicate(timeout=60)[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert [r.returncode for r in ranks] == [ExitCode.PREEMPTED] * 2 == [3, 3], outputs[0][-2000:]
    saved = list((tmp_path / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and "nanomt: preempted: saved" in outputs[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by"] == "preemption"
    assert summary["steps"] == int(saved[0].name.split("_")[1])


def test_a_checkpoint_of_another_format_version_is_refused_clearly(tmp_path):
    run(compose_config(TINY + ["train.steps=1", "checkpoint.interval=1"]), tmp_path / "a")
    meta_file = tmp_path / "a" / "checkpoints" / "step_00000001" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["version"] = 1  # as written before the fused SwiGLU weight (docs/checkpoints.md)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="of version 1; this nanomt reads version"):
        run(compose_config(TINY + ["train.steps=2", "train.resume=auto"]), tmp_path / "a")
