"""The training loop's side of checkpointing: resume at the start, save when due, stop when asked.

    train.resume      none | auto (latest under the checkpoint folder, if any) | <folder>
    checkpoint.interval  save every N steps, and at the end of the run (0: no periodic saves)
    checkpoint.keep_last keep the newest K checkpoints (0: keep all)
    checkpoint.on_error  raise (stop the run, exit code 6) | continue (log, retry at the next
                      interval); a save asked for by a stop always raises when it fails
    train.exit_after  stop cleanly after N steps of this launch, with a checkpoint; the LR
                      schedule still spans train.steps, so a run in several launches equals one
    train.preempt_signal  SIGTERM (default) or e.g. SIGUSR1: save at the end of the current
                      step and stop (SLURM's pre-kill warning); the run then exits with code 3

A resumed run continues bit for bit: weights, AdamW moments and step, the data position, the LR
step and every RNG stream come back exactly.

Every decision is made once and shared, so that no rank acts on its own view of a network file
system: at start-up rank 0 writes a probe file that every rank must read back (the folder is
writable and shared); rank 0 picks the checkpoint to resume from and every rank confirms it can
read it; a save succeeds or fails on every rank together (nanomt.checkpoint.save).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nanomt.checkpoint.format import META_FILE, CheckpointError, check_model_config
from nanomt.checkpoint.load import (
    find_resume_checkpoint,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
)
from nanomt.checkpoint.save import PreemptionSignal, save_checkpoint
from nanomt.checkpoint.state import Optimizer
from nanomt.config import Layout, preempt_signal
from nanomt.config_rules import as_config_error
from nanomt.errors import CheckpointWriteError, ConfigError
from nanomt.parallel import comm

if TYPE_CHECKING:
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
        self.exit_after = cfg.train.exit_after
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
        self.on_error = str(cfg.checkpoint.on_error)
        self.preemption = PreemptionSignal((preempt_signal(cfg),))
        self.stopped_by: str | None = None  # "exit_after" or "preemption" once the loop must stop
        self.start_step = 0
        self.resumed_from: str | None = None
        self.last_saved: Path | None = None

    def check_folder(self) -> None:
        """Start-up, collective: checkpoint.dir is writable by rank 0 and every rank sees what
        rank 0 writes there (the folder is shared), or every rank raises ConfigError."""
        probe = self.dir / ".nanomt_probe"
        token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        error = None
        if comm.world_rank() == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                probe.write_text(token)
            except OSError as problem:
                error = str(problem)
        error, token = comm.broadcast_object((error, token))
        if error is not None:
            raise ConfigError(f"checkpoint folder {self.dir} is not writable ({error})",
                              "set checkpoint.dir (or hydra.run.dir) to a writable folder")
        blind = comm.all_gather_object(None if _sees(probe, token) else
                                       f"rank {comm.world_rank()} on {socket.gethostname()}")
        if comm.world_rank() == 0:
            probe.unlink(missing_ok=True)
        blind = [who for who in blind if who is not None]
        if blind:
            raise ConfigError(
                f"{', '.join(blind)} cannot see the probe file rank 0 wrote in {self.dir}: the "
                f"checkpoint folder is not on a file system shared by every node",
                "set checkpoint.dir (or hydra.run.dir) to a shared folder")

    def choose_resume(self) -> Path | None:
        """Rank 0 resolves train.resume (none, auto: the latest, or a folder) and tells everyone;
        every rank then confirms it can read that checkpoint's meta.json."""
        choice: tuple[str | None, str | None] = (None, None)
        if comm.world_rank() == 0:
            try:
                path = find_resume_checkpoint(self.resume_setting, self.dir)
                choice = (str(path) if path is not None else None, None)
            except CheckpointError as error:
                choice = (None, str(error))
        path, error = comm.broadcast_object(choice)
        if error is not None:
            raise CheckpointError(error)
        if path is None:
            return None
        problems = [p for p in comm.all_gather_object(_cannot_read(Path(path))) if p]
        if problems:
            raise CheckpointError(f"rank 0 resumes from {path}, but " + "; ".join(problems),
                                  "put checkpoint.dir on a file system every node sees alike, "
                                  "or pass the folder in train.resume")
        return Path(path)

    def resume(self, chunks: list[nn.Module], optimizer: Optimizer | None,
               train_data: BatchSource) -> int:
        """Load the checkpoint train.resume names (if any); returns the step to start from.
        Collective: rank 0 chooses; a rank that fails to load makes every rank fail."""
        path = self.choose_resume()
        if path is None:
            return 0
        meta, error = None, None
        try:
            meta = load_checkpoint(path, chunks, optimizer, self.grid, self.run_meta["model"])
        except (CheckpointError, OSError) as problem:
            rank = comm.world_rank()
            error = str(problem) if rank == 0 else f"rank {rank}: {problem}"
        errors = [e for e in comm.all_gather_object(error) if e]
        if errors:  # every rank raises; rank 0's own message first
            raise CheckpointError(errors[0])
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

    def _save_or_continue(self, steps_done: int, stopping: bool, *args) -> None:
        """A failed periodic save is logged and retried at the next interval under
        checkpoint.on_error=continue; otherwise (or when the run stops here) it raises."""
        try:
            self.save(steps_done, *args)
        except CheckpointWriteError as error:
            if stopping or self.on_error != "continue":
                raise
            if comm.world_rank() == 0:
                print(f"nanomt: warning: {error}", flush=True)

    def save_due(self, steps_done: int) -> bool:
        """Whether the step `steps_done` saves without a signal: the interval, the end of the
        run (when saving was asked for at all), or train.exit_after reached."""
        periodic = self.interval > 0 and steps_done % self.interval == 0
        final = steps_done == self.total_steps and (self.interval > 0
                                                    or self.exit_after is not None)
        return periodic or final or self._exit_after_reached(steps_done)

    def _exit_after_reached(self, steps_done: int) -> bool:
        return self.exit_after is not None and steps_done - self.start_step >= int(self.exit_after)

    def after_step(self, steps_done: int, chunks: list[nn.Module], optimizer: Optimizer | None,
                   train_data: BatchSource, lr: float, preempted: bool) -> bool:
        """Save if a checkpoint is due; True when the loop must stop now (exit_after, SIGTERM).

        Collective: every rank calls it after every step. preempted: whether some rank got the
        preemption signal (`self.preemption.received`, MAX-reduced over every rank), as the
        trainer read it in the step's one host sync."""
        if preempted:
            self.stopped_by = "preemption"
        elif self._exit_after_reached(steps_done):
            self.stopped_by = "exit_after"
        stop = self.stopped_by is not None
        if stop or self.save_due(steps_done):
            final = steps_done == self.total_steps
            self._save_or_continue(steps_done, stop or final, chunks, optimizer, train_data, lr)
        return stop

    def close(self) -> None:
        self.preemption.restore()



def check_resume(cfg: DictConfig, model_cfg: ModelConfig) -> None:
    """At start-up (nanomt.launch_checks.check_launch): train.resume=<folder> holds a checkpoint (or a
    `latest` pointer to one) saved for this model's shape; only its meta.json is read.
    train.resume=auto is checked the same way when checkpoint.dir is set and already has a
    checkpoint (else the run folder is not known yet)."""
    resume = cfg.train.resume
    if resume in (None, "", "none", "None"):
        return
    if resume == "auto":
        if not cfg.checkpoint.dir or not (Path(cfg.checkpoint.dir) / "latest").exists():
            return
        resume = cfg.checkpoint.dir
    try:
        folder = resolve_checkpoint(resume)
        saved = read_meta(folder).get("model", {})
        check_model_config(saved, model_cfg.to_dict(), str(folder))
    except CheckpointError as error:
        raise as_config_error(error, "train.resume") from error


def _sees(probe: Path, token: str, patience_s: float = 5.0) -> bool:
    """The probe holds rank 0's token (waiting a little for a lagging network file system)."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            if probe.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _cannot_read(folder: Path) -> str | None:
    """None if this rank can read the checkpoint's meta.json, else what it sees."""
    try:
        json.loads((folder / META_FILE).read_text())
        return None
    except (OSError, ValueError) as error:
        return f"rank {comm.world_rank()} on {socket.gethostname()} cannot read it ({error})"
