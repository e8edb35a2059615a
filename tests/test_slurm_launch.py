"""launch/slurm.sbatch under stand-ins for srun, scontrol and scancel: the run folder follows the
job name (so a requeued or resubmitted job resumes), torchrun gets restarts, the preemption
signal and a shutdown grace period long enough to save, and a preemption warning is forwarded
to the tasks and requeues the job."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "slurm.sbatch"

STUBS = {
    # srun: record its arguments, then behave like torchrun on SIGUSR1: its workers save and
    # exit 3, torchrun itself exits 1 (its SignalException)
    "srun": 'echo "$@" > "$LOG/srun.args"; echo $$ > "$LOG/srun.pid"\n'
            'trap \'echo saved >> "$LOG/srun.events"; exit 1\' USR1\n'
            'for i in $(seq 300); do sleep 0.1; done; exit 0\n',
    "scontrol": 'if [ "$1" = show ]; then echo node-a; echo node-b; else echo "$@" >> '
                '"$LOG/scontrol.calls"; fi\n',
    "scancel": 'echo "$@" >> "$LOG/scancel.calls"; kill -USR1 "$(cat "$LOG/srun.pid")"\n',
}


def test_slurm_script_keeps_the_run_folder_and_requeues_on_preemption(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "my-run", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node-[a-b]"}
    job = subprocess.Popen(["bash", str(SCRIPT), "model=gpt_125m", "parallel.tp=8"],
                           cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not (tmp_path / "srun.pid").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
        time.sleep(0.05)
    args = (tmp_path / "srun.args").read_text().split()
    assert f"hydra.run.dir={tmp_path}/outputs/my-run" in args  # the job name, not the job id
    assert "train.resume=auto" in args and "train.preempt_signal=SIGUSR1" in args
    assert "--max-restarts=3" in args and "--shutdown-timeout=170" in args
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in args
    assert "--rdzv_endpoint=node-a:29500" in args
    assert args[-2:] == ["model=gpt_125m", "parallel.tp=8"]

    job.send_signal(signal.SIGUSR1)  # SLURM's B:USR1@180 warning
    output = job.communicate(timeout=30)[0]
    assert job.returncode == 3, output
    assert (tmp_path / "srun.events").read_text().strip() == "saved"
    assert (tmp_path / "scancel.calls").read_text().split() == ["--signal=USR1", "4242"]
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
