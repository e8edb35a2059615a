"""The training loop's side of checkpointing: resume at the start, save when due, stop when asked.

    train.resume      none | auto (latest under the checkpoint folder, if any) | <folder>
    checkpoint.interval  save every N steps, and at the end of the run (0: no periodic saves)
    checkpoint.keep_last keep the newest K checkpoints (0: keep all)
    train.exit_after  stop cleanly after N steps of this launch, with a checkpoint; the LR
                      schedule still spans train.steps, so a run in several launches equals one
    SIGTERM           save at the end of the current step and stop (SLURM's pre-kill warning)

A resumed run continues bit for bit: weights, AdamW moments and step, the data position, the LR
step and every RNG stream come back exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nanomt.checkpoint.load import find_resume_checkpoint, load_checkpoint
from nanomt.checkpoint.save import PreemptionSignal, save_checkpoint
from nanomt.checkpoint.state import Optimizer

if TYPE_CHECKING:
    from nanomt.config import Layout
    from nanomt.model import ModelConfig
    from nanomt.parallel.grid import ParallelGrid


class BatchSource(Protocol):
    """The training data's resumable position (nanomt.data's sampler wrapper)."""

    consumed_samples: int

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def checkpoint_dir(cfg: DictConfig, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / "checkpoints"


def forget_metrics_after(metrics_file: Path, step: int) -> None:
    """A run killed after its last checkpoint logged steps that the resumed run will redo: drop
    them, so metrics.jsonl reads as one run."""
    if not metrics_file.exists():
        return
    kept = [line for line in metrics_file.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = metrics_file.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, metrics_file)


class Checkpointer:
    def __init__(self, cfg: DictConfig, run_dir: Path, model_cfg: ModelConfig, layout: Layout,
                 grid: ParallelGrid | None, device: torch.device | str = "cpu"):
        self.dir = checkpoint_dir(cfg, run_dir)
        self.run_dir = Path(run_dir)
        self.interval = int(cfg.checkpoint.interval)
        self.keep_last = int(cfg.checkpoint.keep_last)
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be >= 0 (0 keeps every checkpoint), "
                             f"got {self.keep_last}")
        self.exit_after = cfg.train.exit_after
        if self.exit_after is not None and int(self.exit_after) < 1:
            raise ValueError(f"train.exit_after must be >= 1 (or null), got {self.exit_after}")
        self.total_steps = int(cfg.train.steps)
        self.resume_setting = str(cfg.train.resume)
        self.grid, self.device = grid, device
        self.run_meta = {
            "model": model_cfg.to_dict(),
            "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
                       "virtual_stages": layout.virtual_stages,
                       "sequence_parallel": layout.sequence_parallel,
                       "zero_stage": layout.zero_stage},
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        self.preemption = PreemptionSignal()
        self.start_step = 0
        self.resumed_from: str | None = None
        self.last_saved: Path | None = None

    def resume(self, chunks: list[nn.Module], optimizer: Optimizer | None,
               train_data: BatchSource) -> int:
        """Load the checkpoint train.resume names (if any); returns the step to start from."""
        path = find_resume_checkpoint(self.resume_setting, self.dir)
        if path is None:
            return 0
        meta = load_checkpoint(path, chunks, optimizer, self.grid, self.run_meta["model"])
        if meta.get("data"):
            train_data.load_state_dict(meta["data"])
        self.start_step, self.resumed_from = int(meta["step"]), meta["folder"]
        if self.grid is None or self.grid.rank == 0:
            forget_metrics_after(self.run_dir / "metrics.jsonl", self.start_step)
        return self.start_step

    def save(self, steps_done: int, chunks: list[nn.Module], optimizer: Optimizer | None,
             train_data: BatchSource, lr: float) -> Path:
        """The loss scale and Adam's step travel with the optimizer (`scalar_state()`)."""
        meta = dict(self.run_meta)
        meta["data"] = train_data.state_dict()
        meta["consumed_samples"] = train_data.consumed_samples
        meta["schedule"] = {"step": steps_done, "last_lr": lr}
        self.last_saved = save_checkpoint(self.dir, steps_done, chunks, optimizer, self.grid,
                                          meta, self.keep_last)
        return self.last_saved

    def after_step(self, steps_done: int, chunks: list[nn.Module], optimizer: Optimizer | None,
                   train_data: BatchSource, lr: float) -> bool:
        """Save if a checkpoint is due; True when the loop must stop now (exit_after, SIGTERM).

        Collective: every rank calls it after every step."""
        stop = (self.exit_after is not None
                and steps_done - self.start_step >= int(self.exit_after))
        stop = self.preemption.requested(self.device) or stop
        periodic = self.interval > 0 and steps_done % self.interval == 0
        # the end of the run: saved when saving was asked for at all
        final = steps_done == self.total_steps and (self.interval > 0
                                                    or self.exit_after is not None)
        if stop or periodic or final:
            self.save(steps_done, chunks, optimizer, train_data, lr)
        return stop

    def close(self) -> None:
        self.preemption.restore()
