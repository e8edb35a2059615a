"""Train a GPT with nanomt: the run around the training step (nanomt.trainer), read top to
bottom: start-up -> the loop (step, evaluate, log, checkpoint) -> the summary -> leave.

    python -m nanomt.train                                   # tiny model, embedded corpus, CPU
    python -m nanomt.train model=gpt_125m data.tokenizer=gpt2 train.steps=1000
    torchrun --standalone --nproc_per_node=4 -m nanomt.train parallel.tp=4
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from nanomt.config import CONF_DIR, compose_checked
from nanomt.errors import CommunicationError, ExitCode, NanomtError, exit_with
from nanomt.eval.generation import sample_after_training
from nanomt.eval.tasks import score_during_training
from nanomt.launch_checks import check_launch
from nanomt.logger import RunLogger, startup_tables, write_json_atomic
from nanomt.memory import PeakMemoryMeter, memory_report
from nanomt.metrics import is_logging_rank, peak_memory_bytes
from nanomt.parallel import comm
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.launch import agree_on_run_stamp, leave_launch
from nanomt.trainer import Trainer, mean_over_batch, setup


def describe_ranks(grid: ParallelGrid, model: torch.nn.Module) -> list[dict]:
    """Every rank's coordinates, host and parameter count, gathered onto every rank."""
    mine = {"rank": grid.rank, "tp": grid.tp_rank, "cp": grid.cp_rank, "pp": grid.pp_rank,
            "dp": grid.dp_rank,
            "host": socket.gethostname(),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "layers": [[chunk.layer_range.start, chunk.layer_range.stop] for chunk in model]}
    return comm.all_gather_object(mine)


def write_run_json(t: Trainer) -> list[dict]:
    """run.json: resolved config, layout and, per rank, coordinates, host and parameters.
    Returns the per-rank descriptions (on every rank)."""
    ranks = describe_ranks(t.grid, torch.nn.ModuleList(t.model_chunks))  # collective
    if t.grid.rank != 0:
        return ranks
    t.run_dir.mkdir(parents=True, exist_ok=True)
    layout = {"tp": t.layout.tp, "pp": t.layout.pp, "dp": t.layout.dp,
              "virtual_stages": t.layout.virtual_stages, "schedule": str(t.cfg.parallel.schedule),
              "sequence_parallel": t.layout.sequence_parallel, "zero_stage": t.layout.zero_stage}
    write_json_atomic(t.run_dir / "run.json", {
        "config": OmegaConf.to_container(t.cfg, resolve=True), "world_size": t.grid.world_size,
        "layout": layout, "num_microbatches": t.num_microbatches,
        "model_parameters": t.model_cfg.num_parameters(),
        "model_parameters_active": t.model_cfg.num_parameters(active=True),  # MoE: k experts
        "ranks": ranks,
        "started": datetime.now().isoformat(timespec="seconds")})
    return ranks


@torch.no_grad()
def evaluate(t: Trainer) -> float:
    """Mean loss over `train.eval_batches` fixed validation batches of global_batch_size
    sequences: the same sequences, split the same way, under every layout."""
    chunks = t.model_chunks
    for chunk in chunks:
        chunk.eval()
    mbs, grid, G = t.cfg.train.micro_batch_size, t.grid, t.cfg.train.global_batch_size
    loss_sum = torch.zeros((), device=t.device)  # stays on the device: one sync, below
    for inputs, targets in t.val_data.eval_batches(t.cfg.train.eval_batches, G,
                                                   grid.dp_rank, grid.dp_size):
        micro_batches = [t.my_tokens(pair) for pair in zip(inputs.split(mbs), targets.split(mbs))]
        loss_sum += t.forward_backward(chunks, micro_batches, grid, forward_only=True).float()
    for chunk in chunks:
        chunk.train()
    return float(mean_over_batch(loss_sum, t.num_microbatches *
                                 t.cfg.train.eval_batches, grid, t.device))


def evaluate_all(t: Trainer) -> dict:
    """Validation loss and perplexity, and the train.eval_tasks scores."""
    val_loss = evaluate(t)
    scores = {"val_loss": val_loss,
              "val_ppl": math.exp(min(val_loss, 50.0))}  # capped: exp overflows past ~709
    if t.cfg.train.get("eval_tasks"):
        scores.update(score_during_training(
            t.model_chunks, t.grid, t.cfg.data.tokenizer,
            OmegaConf.to_container(t.cfg.train.eval_tasks, resolve=True)))
    return scores


def sample(t: Trainer) -> str:
    """The end-of-run sample from the final weights (train.sample), as a printable line."""
    c = t.cfg.train
    text = sample_after_training(t.model_chunks, t.grid, t.cfg.data.tokenizer,
                                 str(c.sample_prompt), int(c.sample_tokens),
                                 float(c.sample_temperature), int(c.seed))
    return f"nanomt sample:\n{text}"


@contextlib.contextmanager
def naming_communication_failures(position: dict, timeout_s: float) -> Iterator[None]:
    """A collective that failed or timed out (a peer stalled or died) becomes one line naming
    the operation, the group and the step (nanomt.parallel.comm keeps track of them)."""
    try:
        yield
    except NanomtError:
        raise
    except Exception as error:
        if not comm.is_communication_failure(error):
            raise
        raise CommunicationError(
            f"{comm.describe_failure(error, position['where'])}; a rank stalled or died: see "
            f"the first failing rank's log, or raise parallel.timeout_s (now {timeout_s:g} s) "
            f"if the operation is only slow") from error


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole training run; returns the summary. Callable without Hydra (tests do).
    Failures it can name raise a NanomtError (nanomt.errors)."""
    position = {"where": "start-up"}
    with naming_communication_failures(position, float(cfg.parallel.timeout_s)):
        return train(cfg, run_dir, position)


def train(cfg: DictConfig, run_dir: Path, position: dict) -> dict:
    """Set up, then the loop: step, evaluate, log, checkpoint."""
    t = setup(cfg, run_dir)
    ranks = write_run_json(t)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    steps, layout = cfg.train.steps, t.layout
    logger = RunLogger(run_dir, is_logging_rank(t.grid), steps, t.start_step,
                       resolved["logging"]["wandb"], resolved, cfg.train.progress_bar,
                       log_interval=int(cfg.logging.get("log_interval", 10)))
    active = t.model_cfg.num_parameters(active=True)
    logger.print(f"nanomt: {t.model_cfg.num_parameters():,} parameters"
                 + (f" ({active:,} active)" if t.model_cfg.moe else "") + f", layout tp={layout.tp} "
                 f"cp={layout.cp} pp={layout.pp} dp={layout.dp}, {t.num_microbatches} "
                 f"micro-batches/step, run folder {run_dir}")
    logger.print(startup_tables(ranks))
    if t.checkpointer.resumed_from:
        logger.print(f"resumed from {t.checkpointer.resumed_from} at step {t.start_step}")
    logger.start_progress()  # after the start-up lines

    record, val_loss, steps_done = {"loss": float("nan")}, float("nan"), t.start_step
    activation_meter = PeakMemoryMeter(import_now=cfg.train.measure_memory)  # first step
    t_start = time.perf_counter()
    for step in range(t.start_step, steps):
        position["where"] = f"step {step + 1}"
        logged = t.train_step(step, activation_meter)  # None: a step that logs nothing
        steps_done = step + 1
        if logged is not None:
            record = logged
            interval = cfg.train.eval_interval
            if (interval and steps_done % interval == 0) or steps_done == steps:
                record.update(evaluate_all(t))
                val_loss = record["val_loss"]
            logger.log_step(record)
            t.records.check_finite(record, t.checkpointer.last_saved
                                   or t.checkpointer.resumed_from)
        else:
            logger.advance()
        position["where"] = f"the checkpoint after step {steps_done}"
        # the preemption signal, read with the step's values
        if t.checkpointer.after_step(steps_done, t.model_chunks, t.optimizer, t.train_data,
                                     t.lr_at(step), preempted=t.preempted):
            break  # train.exit_after reached, or the preemption signal: saved, stop cleanly

    t.checkpointer.close()
    if t.checkpointer.stopped_by == "preemption":
        logger.print(f"nanomt: preempted: saved {t.checkpointer.last_saved} after step "
                     f"{steps_done}; exiting with code {int(ExitCode.PREEMPTED)} (relaunch with "
                     f"train.resume=auto to continue)")
    if t.timeline is not None:
        t.timeline.save(run_dir / "timeline" / f"rank{t.grid.rank}.json")
    elapsed = time.perf_counter() - t_start
    if cfg.train.get("sample") and t.checkpointer.stopped_by != "preemption":
        logger.print(sample(t))
    seq_len, consumed = t.model_cfg.seq_len, t.train_data.consumed_before  # ramp-up aware
    tokens_this_launch = (consumed(steps_done) - consumed(t.start_step)) * seq_len
    summary = {"steps": steps_done, "final_loss": record["loss"], "val_loss": val_loss,
               "tokens": consumed(steps_done) * seq_len, "time_s": elapsed,
               "tokens_per_s": tokens_this_launch / max(elapsed, 1e-9),
               "stopped_by": t.checkpointer.stopped_by, "skipped_steps": t.records.skipped_steps,
               "logged_by": {"rank": t.grid.rank, "tp": t.grid.tp_rank, "cp": t.grid.cp_rank,
                             "pp": t.grid.pp_rank, "dp": t.grid.dp_rank},
               "memory_per_rank": memory_report(t.optimizer, activation_meter.peak_bytes, t.grid,
                                                peak_memory_bytes(t.device))}
    logger.finish(summary)
    return summary


def preflight(overrides: list[str]) -> None:
    """Check the command line before any process group exists: every rank composes the same
    config and reaches the same verdict, so a bad input stops the launch at once (exit code 2)."""
    if any(arg.startswith("-") for arg in overrides):
        return  # Hydra's own flags (--cfg job, --help, -m): Hydra handles them
    check_launch(compose_checked(overrides), int(os.environ.get("WORLD_SIZE", "1")))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except NanomtError as error:
        exit_with(error)  # inside Hydra's task: Hydra would print its own traceback otherwise
    preempted = summary.get("stopped_by") == "preemption"
    leave_launch(int(ExitCode.PREEMPTED) if preempted else 0)  # a world of one returns
    if preempted:
        sys.exit(int(ExitCode.PREEMPTED))


def main(argv: list[str] | None = None) -> None:
    """`python -m nanomt.train [overrides]`, also under torchrun. `argv` replaces sys.argv[1:]."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        preflight(sys.argv[1:])
    except NanomtError as error:
        exit_with(error)
    if "NANOMT_RUN_STAMP" not in os.environ:  # one run folder for every rank and every restart
        os.environ["NANOMT_RUN_STAMP"] = agree_on_run_stamp(
            datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    hydra_main()


if __name__ == "__main__":
    main()
