"""Failures under torchrun: a rank killed (SIGKILL) or raising an exception restarts the job, which
resumes bit-exactly (one node and two "nodes" over c10d), the preemption signal saves once and
resumes bit-exactly, a stalled rank makes the others fail within the timeout naming the operation
and group.

Every run is a real `python -m nanomt.train` of 4 ranks (gloo, CPU, tp=2 x dp=2), under torchrun
except for the stall, with faults injected through NANOMT_FAULT (nanomt.faults). The restarted and
preempted runs are compared with one uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanomt.testing import free_port

STEPS = 12
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=32",
        "train.global_batch_size=8", "train.micro_batch_size=2", "parallel.tp=2",
        f"train.steps={STEPS}", "train.eval_interval=0", "train.progress_bar=false",
        "train.measure_memory=false", "logging.wandb.mode=disabled"]


def torchrun_cmd(nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--monitor-interval=0.2", *extra]


def environment(fault: str | None = None) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("NANOMT_FAULT", None)
    env.pop("NANOMT_RUN_STAMP", None)
    if fault:
        env["NANOMT_FAULT"] = fault
    return env


def launch(run_dir: Path | None, overrides: list[str], fault: str | None = None,
           restarts: int = 0, timeout: float = 240, cwd: Path | None = None
           ) -> subprocess.CompletedProcess:
    """torchrun of 4 ranks; run_dir None keeps the default run folder (outputs/<stamp>)."""
    folder = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    cmd = torchrun_cmd(4, "--standalone", f"--max-restarts={restarts}") + [
        "-m", "nanomt.train", *TINY, *overrides, *folder]
    return subprocess.run(cmd, env=environment(fault), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "lr")}
            for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The uninterrupted run: the losses every interrupted run must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = launch(run_dir, ["checkpoint.interval=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


@pytest.mark.parametrize("kind", ["kill", "fail"])
def test_killed_rank_restarts_and_resumes_bit_exactly(tmp_path, reference, kind):
    """A rank SIGKILLed, or raising an exception, at step 7. The default run folder
    (outputs/<date>/<time>): the restarted attempt must find the same one, or
    train.resume=auto would start from scratch."""
    result = launch(None, ["checkpoint.interval=4", "train.resume=auto"],
                    fault=f"{kind}:rank=1,step=7", restarts=1, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-2000:] + "\n" + result.stderr[-3000:]
    assert f"injected fault: {kind} on rank 1" in output
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").glob("*/*/run.json")]
    assert "resumed from" in output and "step_00000004 at step 4" in output
    # steps 5-6 of the first attempt were dropped; 5-12 come from the restarted attempt
    assert metrics(run_dir) == reference


@pytest.mark.parametrize("fault", ["kill:rank=3,step=6", "kill:rank=3,at=start"])
def test_two_node_restart_after_a_rank_on_the_second_node_dies(tmp_path, reference, fault):
    """Global rank 3 is local rank 1 of the second node. Killed at step 6, the first node's ranks
    fail too (their peer hung up); killed at start-up, they are still healthy, waiting for it,
    so their agent restarts them for the new membership without counting a restart: the two
    nodes' TORCHELASTIC_RESTART_COUNTs differ, and the attempt must be agreed another way."""
    port = free_port()
    node_args = ["--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                 "--rdzv_id=nanomt-test", "--max-restarts=1"]
    cmd = torchrun_cmd(2, *node_args) + ["-m", "nanomt.train", *TINY, "checkpoint.interval=4",
                                         "train.resume=auto", f"hydra.run.dir={tmp_path}"]
    nodes = [subprocess.Popen(cmd, env=environment(fault), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-4000:] for o in outputs)
    assert "injected fault: kill on rank 3" in "".join(outputs)
    if "step=6" in fault:
        assert "step_00000004 at step 4" in "".join(outputs)
    assert metrics(tmp_path) == reference


def test_preemption_signal_saves_once_and_resumes_bit_exactly(tmp_path, reference):
    """SIGTERM to torchrun (what SLURM does): torchrun forwards it, every rank finishes its
    step, they save one checkpoint together and stop; train.resume=auto continues exactly."""
    cmd = torchrun_cmd(4, "--standalone") + [
        "-m", "nanomt.train", *TINY, "checkpoint.interval=0", "train.resume=auto",
        f"hydra.run.dir={tmp_path}"]
    agent = subprocess.Popen(cmd, env=environment(), text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    metrics_file = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2):
        assert agent.poll() is None and time.monotonic() < deadline, agent.stdout.read()[-3000:]
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)
    output = agent.communicate(timeout=120)[0]
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert len(saved) == 1, output[-3000:]
    stopped_at = int(saved[0].split("_")[1])
    assert stopped_at < STEPS, "the signal came too late to test anything"
    # the workers' exit code 3 (tests/test_failure_paths.py) is not torchrun's: after a
    # forwarded signal torchrun raises its SignalException (exit code 1)
    assert "nanomt: preempted: saved" in output and "exiting with code 3" in output
    assert agent.returncode == 1 and "got signal: 15" in output, output[-3000:]
    assert "forcefully exiting" not in output  # the workers saved within --shutdown-timeout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by"] == "preemption" and summary["steps"] == stopped_at

    result = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {stopped_at}" in result.stdout + result.stderr
    assert metrics(tmp_path) == reference


STALLS = {
    # rank 1 hangs before step 3's gradient reduction: its tp/dp/model-parallel peers wait
    "in_step": ("stall:rank=1,step=3,at=optimizer", [],
                r"(all_reduce|reduce_scatter|all_gather)\S* .*on the (dp|tp|model_parallel) "
                r"group failed during step 3"),
    # rank 1 hangs writing checkpoint 3: everyone waits on the world group, whose timeout is
    # parallel.timeout_s too
    "in_save": ("stall:rank=1,step=3,at=save", ["checkpoint.interval=3"],
                r"(gather_object|broadcast_object) on the world group failed during the "
                r"checkpoint after step 3"),
}


@pytest.mark.parametrize("case", sorted(STALLS))
def test_stalled_rank_makes_the_others_fail_within_the_timeout(tmp_path, case):
    """Four ranks started by hand (no torchrun, so that torchrun does not stop the others once the
    first has failed, and rank 0 hosts the store): rank 1 hangs; each other rank exits with code
    5 within the timeout plus a margin, naming the operation, the group and the step."""
    fault, overrides, expected = STALLS[case]
    timeout_s, port = 4, free_port()
    cmd = [sys.executable, "-m", "nanomt.train", *TINY, f"parallel.timeout_s={timeout_s}",
           "checkpoint.interval=0", *overrides, f"hydra.run.dir={tmp_path}"]
    env = environment(fault)
    env.update(WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ranks = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(4)]
    try:
        for line in ranks[1].stdout:
            if "injected fault: stall on rank 1" in line:
                break
        stalled_at = time.monotonic()
        for rank in (0, 2, 3):
            output = ranks[rank].communicate(timeout=timeout_s + 60)[0]
            took = time.monotonic() - stalled_at
            assert ranks[rank].returncode == 5, output[-3000:]  # ExitCode.COMMUNICATION
            assert took < timeout_s + 20, took  # start-up of the others is not in it
            (line,) = [x for x in output.splitlines() if "nanomt: error:" in x]
            assert line.startswith(f"[rank {rank}] nanomt: error: ")
            assert re.search(expected, line), line
            assert "parallel.timeout_s" in line
        assert ranks[1].poll() is None  # still hung: only the others could notice
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
