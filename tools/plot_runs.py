"""Compare runs: training loss, validation loss and throughput against tokens, one line a run.

    python tools/plot_runs.py outputs/2026-01-01/10-00-00 outputs/2026-01-01/11-00-00 \
        --output compare.png [--labels tp2pp2 tp4]

Reads each run folder's metrics.jsonl (and run.json for a label naming its layout); tokens on
the x axis put runs of different batch sizes or layouts on one scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("loss", "training loss"), ("val_loss", "validation loss"),
          ("tokens_per_s", "tokens/s"))


def read_run(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist (is {run_dir} a run folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def default_label(run_dir: Path) -> str:
    """The folder, and the layout from run.json when there is one."""
    info_path = run_dir / "run.json"
    if not info_path.exists():
        return str(run_dir)
    layout = json.loads(info_path.read_text())["layout"]
    return (f"{run_dir.name} (tp{layout['tp']} pp{layout['pp']} dp{layout['dp']} "
            f"zero{layout['zero_stage']})")


def figure_of_runs(run_dirs: list[Path], labels: list[str] | None = None) -> plt.Figure:
    """A panel per metric of PANELS, a line per run (only the steps that carry the metric)."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for i, run_dir in enumerate(run_dirs):
        records = read_run(run_dir)
        label = labels[i] if labels else default_label(run_dir)
        for ax, (key, _) in zip(axes, PANELS):
            points = [(r["tokens"], r[key]) for r in records if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 20 else None, label=label)
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: list[Path], output: Path, labels: list[str] | None = None) -> None:
    """figure_of_runs, written to the PNG `output`."""
    fig = figure_of_runs(run_dirs, labels)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--labels", nargs="+", help="one legend label per run")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.run_dirs):
        parser.error(f"--labels gives {len(args.labels)} labels for {len(args.run_dirs)} runs")
    plot_runs(args.run_dirs, args.output, args.labels)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
