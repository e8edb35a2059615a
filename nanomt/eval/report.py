"""Evaluation results for people and programs: a console table, results.json, W&B.

    task        kind             acc     acc_norm  ppl      examples
    validation  perplexity       -       -         4.21     8192 tokens
    piqa        multiple_choice  0.6250  0.6875    -        16

Only global rank 0 writes; every rank holds the same results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanomt.logger import write_json_atomic

COLUMNS = ("acc", "acc_norm", "loss", "ppl")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_table(results: dict[str, dict]) -> str:
    """One row per task: {name: {"kind", "metrics", "count"}} -> aligned text."""
    rows = [("task", "kind", *COLUMNS, "examples")]
    for name, result in results.items():
        metrics = result["metrics"]
        rows.append((name, result["kind"], *(_cell(metrics.get(c)) for c in COLUMNS),
                     str(result["count"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def write_results(run_dir: Path, payload: dict) -> Path:
    """results.json in the run folder (atomic)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "results.json"
    write_json_atomic(path, payload)
    return path


def log_to_wandb(run_dir: Path, wandb_cfg: dict, config: dict, results: dict[str, dict]) -> None:
    """eval/<task>/<metric> into one W&B run (offline by default, never a login)."""
    if not wandb_cfg or wandb_cfg.get("mode", "disabled") == "disabled":
        return
    import wandb  # slow to import: only when used

    run = wandb.init(project=wandb_cfg.get("project", "nanomt"), name=wandb_cfg.get("name"),
                     mode=wandb_cfg["mode"], dir=str(run_dir), config=config, job_type="eval",
                     settings=wandb.Settings(silent=True))
    run.summary.update({f"eval/{name}/{metric}": value for name, result in results.items()
                        for metric, value in result["metrics"].items()})
    run.finish()
