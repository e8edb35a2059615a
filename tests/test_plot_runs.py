"""tools/plot_runs.py: what it draws is what the runs' metrics.jsonl hold, run by run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def plot_tool():
    spec = importlib.util.spec_from_file_location("plot_runs", REPO / "tools" / "plot_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(run_dir: Path, tokens_per_step: int, tp: int) -> list[dict]:
    run_dir.mkdir(parents=True)
    records = [{"step": s, "tokens": s * tokens_per_step, "loss": 5.0 - 0.1 * s + 0.01 * tp,
                "tokens_per_s": 1000.0 * tp + s, **({"val_loss": 4.9 - 0.1 * s} if s % 2 == 0
                                                   else {})} for s in range(1, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "run.json").write_text(json.dumps(
        {"layout": {"tp": tp, "pp": 1, "dp": 2 // tp, "zero_stage": 1}}))
    return records


def test_each_panel_draws_each_runs_metric_against_tokens(tmp_path):
    tool = plot_tool()
    runs = {"a": write_run(tmp_path / "a", 512, 1), "b": write_run(tmp_path / "b", 1024, 2)}
    fig = tool.figure_of_runs([tmp_path / "a", tmp_path / "b"])
    for ax, (key, title) in zip(fig.axes, tool.PANELS):
        assert ax.get_title() == title
        for line, records in zip(ax.get_lines(), runs.values()):
            kept = [r for r in records if key in r]
            assert list(line.get_xdata()) == [r["tokens"] for r in kept]
            assert list(line.get_ydata()) == pytest.approx([r[key] for r in kept])
    assert [line.get_label() for line in fig.axes[0].get_lines()] == [
        "a (tp1 pp1 dp2 zero1)", "b (tp2 pp1 dp1 zero1)"]
    assert len(fig.axes[1].get_lines()[0].get_xdata()) == 2  # the eval steps only

    out = tmp_path / "cmp.png"
    tool.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out),
               "--labels", "one", "two"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist"):
        tool.main([str(tmp_path / "missing"), "--output", str(out)])
