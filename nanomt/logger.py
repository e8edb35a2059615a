"""What a run tells its user: metrics.jsonl per step, W&B, and the console: tables of the layout
and of parameters per stage at start, then a progress bar with its ETA and a one-line log every
`logging.log_interval` steps.

Only the logging rank (nanomt.metrics.is_logging_rank) writes and prints; every other rank's
logger is silent (rank 0 writes run.json, train.py). W&B defaults to offline mode (files under
<run>/wandb, `wandb sync` later), never asks for a login, and is not even imported when
disabled; it gets the project, entity, run name, tags and the whole resolved config.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


MAX_TABLE_RANKS = 16  # rows of the start-up layout table; a 2,240-rank table says no more


def startup_tables(ranks: list[dict]) -> str:
    """The layout (global rank -> tp/cp/pp/dp coordinates and host) and the parameters per
    pipeline stage (per rank: the largest over its tp ranks; and the stage over all of them),
    from train.describe_ranks."""
    lines = ["rank  tp  cp  pp  dp  host"]
    lines += [f"{r['rank']:>4}  {r['tp']:>2}  {r['cp']:>2}  {r['pp']:>2}  {r['dp']:>2}  {r['host']}"
              for r in ranks[:MAX_TABLE_RANKS]]
    if len(ranks) > MAX_TABLE_RANKS:
        lines.append(f"... {len(ranks) - MAX_TABLE_RANKS} more ranks (run.json lists them all)")
    lines.append("stage  layers      params/rank  params/stage")
    for stage in sorted({r["pp"] for r in ranks}):
        replica = [r for r in ranks if r["pp"] == stage and r["dp"] == 0 and r["cp"] == 0]
        layers = ",".join(f"{a}-{b - 1}" for a, b in replica[0]["layers"])
        per_rank = max(r["num_parameters"] for r in replica)
        total = sum(r["num_parameters"] for r in replica)
        lines.append(f"{stage:>5}  {layers:<10}  {per_rank:>11,}  {total:>12,}")
    return "\n".join(lines)


def one_line(record: dict, total_steps: int) -> str:
    """The periodic console line: step, loss, learning rate, throughput, MFU, memory."""
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})")
    parts += [f"lr {record['lr']:.2e}", f"grad norm {record['grad_norm']:.3f}",
              f"{record['step_time_s'] * 1e3:.0f} ms/step", f"{record['tokens_per_s']:,.0f} tok/s",
              f"{record['tflops_per_gpu']:.3g} TFLOP/s/GPU"]
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"mem {record['peak_memory_gb_max_rank']:.2f} GB")
    return " | ".join(parts)


class RunLogger:
    def __init__(self, run_dir: Path, is_writer: bool, total_steps: int, start_step: int,
                 wandb_cfg: dict | None, config: dict, progress_bar: bool = True,
                 log_interval: int = 10):
        self.run_dir, self.is_writer = run_dir, is_writer
        self.total_steps, self.start_step = total_steps, start_step
        self.progress_bar, self.log_interval = progress_bar, log_interval
        self.metrics_file = None
        self.wandb_run = None
        self.bar = None
        self.start_time = time.perf_counter()
        if not is_writer:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_cfg and wandb_cfg.get("mode", "disabled") != "disabled":
            self.wandb_run = self._start_wandb(wandb_cfg, config)

    def start_progress(self) -> None:
        """The progress bar (steps, ETA), once the start-up lines are printed."""
        if self.is_writer and self.progress_bar and self.bar is None:
            self.bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train",
                            dynamic_ncols=True, file=sys.stdout, mininterval=0.5)

    def _start_wandb(self, wandb_cfg: dict, config: dict):
        """One W&B run per run folder: a restarted or resumed launch continues the same run
        (its id is kept in <run>/wandb_run_id)."""
        if wandb_cfg["mode"] == "offline":
            # offline means nothing leaves the machine: W&B's own error and usage reports
            # (OpenTelemetry posts to its server) would, unless switched off
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb  # imported only when used: it is slow to import

        id_file = self.run_dir / "wandb_run_id"
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(4))
        return wandb.init(project=wandb_cfg.get("project", "nanomt"), name=wandb_cfg.get("name"),
                          entity=wandb_cfg.get("entity"), tags=wandb_cfg.get("tags") or None,
                          mode=wandb_cfg["mode"], dir=str(self.run_dir), config=config,
                          id=id_file.read_text().strip(), resume="allow",
                          settings=wandb.Settings(silent=True))

    def log_step(self, record: dict) -> None:
        if not self.is_writer:
            return
        self.metrics_file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and v is not None},
                               step=record["step"])
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{record['loss']:.4f}"}, refresh=False)
        self.advance()
        if "val_loss" in record or record["step"] % self.log_interval == 0:
            self.print(one_line(record, self.total_steps))

    def advance(self) -> None:
        """One more step on the progress bar (a step that logs nothing calls only this)."""
        if self.bar is not None:
            self.bar.update(1)

    def print(self, message: str) -> None:
        if not self.is_writer:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def finish(self, summary: dict) -> None:
        if not self.is_writer:
            return
        if self.bar is not None:
            self.bar.close()
        write_json_atomic(self.run_dir / "summary.json", summary)
        parts = [f"steps={summary['steps']}", f"loss={summary['final_loss']:.4f}"]
        if summary.get("val_loss") is not None:
            parts.append(f"val_loss={summary['val_loss']:.4f}")
            parts.append(f"val_ppl={math.exp(min(summary['val_loss'], 50)):.2f}")
        parts += [f"tokens={summary['tokens']}", f"time={summary['time_s']:.1f}s",
                  f"tokens/s={summary['tokens_per_s']:.0f}", f"run_dir={self.run_dir}"]
        print("nanomt done: " + " ".join(parts), flush=True)
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary)
            self.wandb_run.finish()
        self.metrics_file.close()
