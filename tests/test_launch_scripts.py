"""The launch/ scripts: every one parses (`bash -n`); the SLURM dry run prints the commands of a
two-node job and runs none; the multi-node script takes its settings from arguments or the
environment; and a two-"node" run on this machine, two torchrun processes of 2 workers each
meeting by c10d rendezvous on the loopback, trains tp=2 x pp=2 through that script, with
exactly one rank logging (metrics.jsonl, W&B offline files, console) and nothing sent to W&B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanomt.testing import free_port
from run_probes import ConnectionCounter

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
MULTINODE = LAUNCH / "torchrun_multinode.sh"


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.iterdir() if p.is_file()))
def test_every_launch_script_parses(script):
    result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_slurm_dry_run_prints_the_commands_for_two_nodes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node-a; echo node-b\n")
    (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\ntouch {tmp_path}/srun-ran\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "big", "SLURM_JOB_NODELIST": "node-[a-b]",
           "GPUS_PER_NODE": "8"}
    result = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "--dry-run", "model=gpt_1_3b",
                             "parallel.tp=8", "parallel.pp=2"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "srun-ran").exists()
    torchrun = (f"python -m torch.distributed.run --nnodes=2 --nproc_per_node=8 "
                f"--rdzv_id=big-77 --rdzv_backend=c10d --rdzv_endpoint=node-a:29500 "
                f"--max-restarts=3 --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "
                f"--shutdown-timeout=170 -m nanomt.train hydra.run.dir={tmp_path}/outputs/big "
                f"train.resume=auto train.preempt_signal=SIGUSR1 model=gpt_1_3b parallel.tp=8 "
                f"parallel.pp=2")
    assert result.stdout.splitlines() == [
        "# 2 nodes x 8 GPUs; rendezvous at node-a:29500",
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 " + torchrun,
        "# on node-a: " + torchrun, "# on node-b: " + torchrun]


def test_multinode_script_reads_arguments_or_the_environment():
    by_args = subprocess.run(
        ["bash", str(MULTINODE), "--nnodes", "4", "--node-rank", "3", "--master-addr", "10.1.2.3",
         "--master-port", "6000", "--nproc-per-node", "8", "--dry-run", "parallel.tp=8"],
        env={**os.environ, "PYTHON": "python"}, capture_output=True, text=True, timeout=30)
    env = {**os.environ, "PYTHON": "python", "NNODES": "4", "NODE_RANK": "3",
           "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "6000", "NPROC_PER_NODE": "8"}
    by_env = subprocess.run(["bash", str(MULTINODE), "--dry-run", "parallel.tp=8"], env=env,
                            capture_output=True, text=True, timeout=30)
    expected = ("python -m torch.distributed.run --nnodes=4 --node_rank=3 --nproc_per_node=8 "
                "--rdzv_backend=c10d --rdzv_endpoint=10.1.2.3:6000 --rdzv_id=nanomt "
                "-m nanomt.train parallel.tp=8\n")
    assert by_args.stdout == by_env.stdout == expected, by_args.stderr + by_env.stderr
    missing = subprocess.run(["bash", str(MULTINODE), "--nnodes", "2", "--dry-run"],
                             env={k: v for k, v in os.environ.items() if k != "NODE_RANK"},
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "--node-rank or NODE_RANK" in missing.stderr


def test_two_node_launch_trains_tp2_pp2_with_one_logging_rank(tmp_path):
    listener = ConnectionCounter()
    port = free_port()
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "WANDB_BASE_URL": listener.url, "WANDB_API_KEY": "x" * 40, "PYTHONPATH": str(REPO)}
    overrides = ["parallel.tp=2", "parallel.pp=2", "model.num_layers=2", "model.seq_len=32",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=3",
                 "train.eval_interval=0", "train.eval_batches=1", "checkpoint.interval=0",
                 "logging.wandb.mode=offline", "logging.log_interval=1",
                 f"hydra.run.dir={tmp_path}"]
    nodes = [subprocess.Popen(
        ["bash", str(MULTINODE), "--nnodes", "2", "--node-rank", str(rank), "--master-addr",
         "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "2", "--run-id",
         "two-nodes", *overrides], env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT) for rank in range(2)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
        listener.stop()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert listener.http_requests == [], listener.first_bytes

    info = json.loads((tmp_path / "run.json").read_text())
    assert info["world_size"] == 4 and info["layout"]["tp"] == 2 and info["layout"]["pp"] == 2
    assert sorted((r["tp"], r["pp"]) for r in info["ranks"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # one writer, one line a step
    assert records[-1]["tokens"] == 3 * 4 * 32
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the last stage's tp 0: global rank (pp_rank dp + dp_rank) tp + tp_rank = 2
    assert summary["logged_by"] == {"rank": 2, "tp": 0, "cp": 0, "pp": 1, "dp": 0}
    # every rank's peak at the end, at least the most over ranks the last step logged
    peaks = [r["peak_process"] for r in summary["memory_per_rank"]]
    assert len(peaks) == 4 and max(peaks) >= records[-1]["peak_memory_gb_max_rank"] * 2**30
    assert min(peaks) < records[-1]["peak_memory_gb_max_rank"] * 2**30 * 1.5
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    everything = "".join(outputs)
    assert everything.count("nanomt done:") == 1 and everything.count("step 3/3 | loss") == 1
    assert everything.count("rank  tp  cp  pp  dp  host") == 1
