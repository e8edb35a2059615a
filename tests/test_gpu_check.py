"""tools/gpu_check.py, the one command for the first GPU at hand, cannot rot: its CPU form
(`--device cpu --quick`, gloo instead of NCCL, tiny sizes) runs here and its JSON is checked;
a failing part is recorded and does not stop the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools")]

import gpu_check  # noqa: E402

RUNS_ON_CPU = ["versions", "collectives", "train_smoke", "resume", "recompute_dropout",
               "one_sync_step", "mfu"]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device",
                           "cpu", "--quick", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_every_part_that_can_run_on_cpu_passes_and_the_rest_say_why(quick_report):
    report, printed = quick_report
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    assert {name: parts[name]["status"] for name in RUNS_ON_CPU} == \
        dict.fromkeys(RUNS_ON_CPU, "pass"), {n: p["detail"] for n, p in parts.items()}
    assert parts["cpu_vs_cuda"] == {**parts["cpu_vs_cuda"], "status": "skipped",
                                    "detail": "needs CUDA"}
    assert report["device"] == "cpu" and report["quick"] is True
    assert "bitwise equal" in parts["resume"]["detail"]
    assert "gloo cannot send to itself" in parts["collectives"]["detail"]
    for name in gpu_check.PARTS:  # the printed table: one line per part
        assert any(line.startswith(f"{name} ") for line in printed.splitlines()), name


def test_the_mfu_table_comes_back_with_its_phases(quick_report):
    report, printed = quick_report
    tiny = report["mfu"]["models"]["tiny"]
    for who in ("nanomt", "plain"):
        r = tiny[who]
        assert r["micro_batches"] > 1 and r["tokens_per_s"] > 0
        assert set(r["phase_s"]) == {"forward", "backward", "optimizer"}
        assert sum(r["phase_share"].values()) == pytest.approx(1.0)
        assert r["mfu"] is None  # a CPU has no known peak
    assert "| tiny |" in printed


def test_a_failing_part_is_recorded_and_the_others_still_run(monkeypatch, tmp_path):
    def broken(check):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check.PARTS, "versions", broken)
    out = tmp_path / "report.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--parts", "versions", "cpu_vs_cuda",
                           "recompute_dropout", "--out", str(out)])
    parts = json.loads(out.read_text())["parts"]
    assert code == 1
    assert parts["versions"]["status"] == "fail" and "boom" in parts["versions"]["detail"]
    assert parts["cpu_vs_cuda"]["status"] == "skipped"
    assert parts["recompute_dropout"]["status"] == "pass"
