"""What a run tells its user: run.json at start, metrics.jsonl per step, a progress bar, W&B.

Only global rank 0 writes and prints; every other rank's logger is silent. W&B defaults to
offline mode (files under <run>/wandb, `wandb sync` later), never asks for a login, and is not
even imported when disabled.
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


class RunLogger:
    def __init__(self, run_dir: Path, is_writer: bool, total_steps: int, start_step: int,
                 wandb_cfg: dict | None, config: dict, progress_bar: bool = True):
        self.run_dir, self.is_writer = run_dir, is_writer
        self.metrics_file = None
        self.wandb_run = None
        self.bar = None
        self.start_time = time.perf_counter()
        if not is_writer:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train",
                            dynamic_ncols=True, file=sys.stdout, mininterval=0.5)
        if wandb_cfg and wandb_cfg.get("mode", "disabled") != "disabled":
            self.wandb_run = self._start_wandb(wandb_cfg, config)

    def _start_wandb(self, wandb_cfg: dict, config: dict):
        """One W&B run per run folder: a restarted or resumed launch continues the same run
        (its id is kept in <run>/wandb_run_id)."""
        import wandb  # imported only when used: it is slow to import

        id_file = self.run_dir / "wandb_run_id"
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(4))
        return wandb.init(project=wandb_cfg.get("project", "nanomt"), name=wandb_cfg.get("name"),
                          mode=wandb_cfg["mode"], dir=str(self.run_dir), config=config,
                          id=id_file.read_text().strip(), resume="allow",
                          settings=wandb.Settings(silent=True))

    def log_step(self, record: dict) -> None:
        if not self.is_writer:
            return
        self.metrics_file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"},
                               step=record["step"])
        if self.bar is not None:
            postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                       "tok/s": f"{record.get('tokens_per_s', 0):.0f}"}
            if "val_loss" in record:
                postfix["val"] = f"{record['val_loss']:.4f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif "val_loss" in record or record["step"] % 10 == 0:
            self.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in record.items()))

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
