"""Train a GPT with nanomt. Read top to bottom: config -> grid -> model -> optimizer -> data -> loop.

    python -m nanomt.train                                   # tiny model, embedded corpus, CPU
    python -m nanomt.train model=gpt_125m data.tokenizer=gpt2 train.steps=1000
    torchrun --standalone --nproc_per_node=4 -m nanomt.train parallel.tp=4

One optimizer step: every data-parallel rank runs its m = G / (b * dp) micro-batches through the
model (gradient accumulation, or a pipeline schedule), gradients are reduced over the dp group,
clipped by their global norm, and AdamW updates the weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from nanomt import faults
from nanomt.checkpoint.checkpointer import Checkpointer
from nanomt.config import CONF_DIR, Layout, compose_checked
from nanomt.eval.generation import sample_after_training
from nanomt.eval.tasks import score_during_training
from nanomt.errors import (
    CommunicationError,
    ExitCode,
    NanomtError,
    NonFiniteError,
    exit_with,
)
from nanomt.data import GlobalBatchSampler
from nanomt.data.build import build_samplers
from nanomt.data.rampup import schedule_position
from nanomt.flops import flops_per_iteration, hardware_flops_per_iteration, peak_tflops
from nanomt.interval_metrics import IntervalLog, StepRead, read_step
from nanomt.launch_checks import check_launch
from nanomt.logger import RunLogger, startup_tables, write_json_atomic
from nanomt.memory import PeakMemoryMeter, memory_report
from nanomt.metrics import (
    is_logging_rank,
    peak_memory_bytes,
    throughput,
)
from nanomt.model import GPT, ModelConfig
from nanomt.model.checkpointing import set_activation_checkpointing
from nanomt.model.chunks import build_model_chunks
from nanomt.optim import build_optimizer
from nanomt.optim.schedule import WarmupCosine
from nanomt.parallel import comm
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.launch import agree_on_run_stamp, init_distributed, leave_launch
from nanomt.parallel.random import seed_everything
from nanomt.parallel.context_parallel import split_sequence
from nanomt.parallel.data_parallel import finalize_grads
from nanomt.parallel.forward_backward import get_forward_backward_func
from nanomt.parallel.pipeline import Timeline


def pick_device(name: str) -> torch.device:
    """train.device: auto picks this rank's GPU if there is one (check_config checked cuda)."""
    if name == "auto":
        return (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                else torch.device("cpu"))
    return torch.device(name)


def to_device(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch onto `device`; to a GPU from pinned memory, without blocking the host."""
    if device.type != "cuda":
        return tokens.to(device)
    return tokens.pin_memory().to(device, non_blocking=True)


def build_data(cfg: DictConfig, model_cfg: ModelConfig
               ) -> tuple[GlobalBatchSampler, GlobalBatchSampler]:
    """The train and validation samplers over indexed sample streams (nanomt.data.build):
    data.blend, data.path or a text corpus (data.name) preprocessed once into the cache; the
    tokenizer was checked against model.vocab_size by check_launch."""
    return build_samplers(cfg, model_cfg.seq_len)


def build_model(model_cfg: ModelConfig, layout: Layout, grid: ParallelGrid, seed: int,
                device: torch.device) -> list[GPT]:
    """This rank's model chunks: the whole model, or the v chunks of its pipeline stage."""
    return build_model_chunks(model_cfg, grid, layout.virtual_stages, seed=seed,
                              sequence_parallel=layout.sequence_parallel, device=device)


def describe_ranks(grid: ParallelGrid, model: torch.nn.Module) -> list[dict]:
    """Every rank's coordinates, host and parameter count, gathered onto every rank."""
    mine = {"rank": grid.rank, "tp": grid.tp_rank, "cp": grid.cp_rank, "pp": grid.pp_rank,
            "dp": grid.dp_rank,
            "host": socket.gethostname(),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "layers": [[chunk.layer_range.start, chunk.layer_range.stop] for chunk in model]}
    return comm.all_gather_object(mine)


def mean_over_batch(loss_sum: torch.Tensor, num_microbatches: int, grid: ParallelGrid,
                    device: torch.device) -> torch.Tensor:
    """The global batch's mean loss [1], on every rank (only last stages hold a loss). On the
    device: the all-reduces run there (NCCL has no CPU path), and no host read happens here."""
    loss = loss_sum.to(device=device, dtype=torch.float32).reshape(1) / num_microbatches
    if not grid.is_last_stage:
        loss.zero_()
    comm.all_reduce(loss, grid.pp_group)  # from the last stage to all stages
    comm.all_reduce(loss, grid.grad_sync_group)  # dp x cp: equal tokens on every cp rank
    return loss / (grid.dp_size * grid.cp_size)


@dataclass
class Trainer:
    """Everything the training loop touches, built once by `setup`."""

    cfg: DictConfig
    run_dir: Path
    model_cfg: ModelConfig
    layout: Layout
    grid: ParallelGrid
    device: torch.device
    num_microbatches: int
    model_chunks: list[GPT]
    forward_backward: Callable
    optimizer: Any
    lr_at: WarmupCosine
    train_data: GlobalBatchSampler
    val_data: GlobalBatchSampler
    checkpointer: Checkpointer
    timeline: Timeline | None
    start_step: int
    flops_per_step: float     # model FLOPs of one optimizer step (nanomt.flops)
    hardware_flops_per_step: float  # the same, recompute counted
    peak_tflops: float | None       # per device, for MFU (logging.peak_tflops or known GPUs)
    skipped_steps: int = 0    # updates skipped so far in this launch (inf/nan)
    preempted: bool = False   # some rank got the preemption signal (read with the last step)
    nonfinite_in_a_row: int = 0  # steps in a row whose loss or gradient norm was not finite
    over_limit_at: int | None = None  # the step past train.max_skipped_steps non-finite in a row
    interval: IntervalLog = field(default_factory=IntervalLog)  # sums between records

    def micro_batches(self, data: GlobalBatchSampler, step: int) -> list[tuple]:
        """This dp rank's m_t = B_t / (b * dp) micro-batches of the global batch of `step` (B_t
        grows during a ramp-up). Only the first and last pipeline stages read tokens; a middle
        stage receives activations and gets placeholders of the micro-batch shape."""
        mbs, grid = self.cfg.train.micro_batch_size, self.grid
        m = data.num_microbatches(grid.dp_size, mbs, step)
        if not (grid.is_first_stage or grid.is_last_stage):
            data.mark_served(step)
            blank = torch.zeros((), dtype=torch.long, device=self.device).expand(
                mbs, self.model_cfg.seq_len // grid.cp_size)
            return [(blank, blank)] * m
        return [self.my_tokens(data.micro_batch(step, i, grid.dp_rank, grid.dp_size, mbs))
                for i in range(m)]

    def my_tokens(self, micro_batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Inputs and labels on the device; under context parallelism this cp rank's two
        chunks of every sequence (nanomt.parallel.context_parallel)."""
        grid = self.grid
        return tuple(to_device(split_sequence(t, 1, grid.cp_rank, grid.cp_size), self.device)
                     for t in micro_batch)

    def logs_at(self, steps_done: int) -> bool:
        """Whether step `steps_done` (1-based) writes a metrics record: every
        logging.metrics_interval-th step, and the steps that have a reason to (evaluation, a
        checkpoint, train.exit_after, the last step; a stop or a preemption, in train_step)."""
        c = self.cfg.train
        every = int(self.cfg.logging.get("metrics_interval", 1))
        return (steps_done % every == 0 or steps_done == int(c.steps)
                or bool(c.eval_interval and steps_done % int(c.eval_interval) == 0)
                or self.checkpointer.save_due(steps_done))

    def train_step(self, step: int, measure: PeakMemoryMeter) -> dict | None:
        """One optimizer step over the global batch of `step`; returns its metrics record, or
        None on a step that writes none (`logs_at`). Each phase is one call; the step reads the
        device once, between clipping and the update (nanomt.interval_metrics.read_step)."""
        self.interval.start_step()
        faults.inject("step", step + 1)
        micro_batches = self.micro_batches(self.train_data, step)
        optimizer = self.optimizer
        optimizer.zero_grad(num_microbatches=len(micro_batches))
        if self.timeline is not None:
            self.timeline.begin_step(step + 1)
        with measure.watch(step == self.start_step and self.cfg.train.measure_memory):
            loss_sum = self.forward_backward(self.model_chunks, micro_batches, self.grid,
                                             timeline=self.timeline,
                                             loss_scale=optimizer.loss_scale)
        faults.inject("optimizer", step + 1)
        loss = mean_over_batch(loss_sum, len(micro_batches), self.grid, self.device)
        # data-parallel reductions complete; sequence-parallel and tied-embedding sums
        finalize_grads(optimizer.buffer)
        # the global norm and the inf/nan verdict, on the device; clip by the norm
        totals = optimizer.clip_grads()
        read = read_step(step + 1, totals, loss, self.grid, self.device,  # the one host read
                         self.checkpointer.preemption.received, optimizer.loss_scaler)
        self.preempted = read.preempted
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step(read.grad_norm, read.skipped)  # AdamW on my shards unless inf/nan
        self.count_nonfinite(step, read)
        self.interval.add(read)
        if not (self.logs_at(step + 1) or self.over_limit_at is not None or self.preempted):
            return None
        return self.step_metrics(step, read, lr)

    def count_nonfinite(self, step: int, read: StepRead) -> None:
        """bf16/fp32: the run of steps whose loss or gradient norm is not finite; past
        train.max_skipped_steps in a row, `over_limit_at` names the step (check_finite stops
        the run after its record). fp16's loss scaler has a stop of its own."""
        self.skipped_steps += read.skipped
        finite = math.isfinite(read.loss) and math.isfinite(read.grad_norm)
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        c = self.cfg.train
        if c.precision != "fp16" and self.nonfinite_in_a_row > int(c.max_skipped_steps):
            self.over_limit_at = step + 1

    def step_metrics(self, step: int, read: StepRead, lr: float) -> dict:
        """A logging step's record (nanomt.metrics): its loss, optimizer state, memory (bytes:
        this rank's peak, the largest), its interval's mean loss, skips and throughput."""
        batch = self.train_data.batch_size(step)
        consumed = self.train_data.consumed_before(step + 1)
        interval = self.interval.close()
        steps = interval["interval_steps"]
        first = step + 1 - steps  # the interval's first step, 0-based
        mean_batch = (consumed - self.train_data.consumed_before(first)) / steps
        share = mean_batch / self.cfg.train.global_batch_size  # of the FLOPs, during a ramp-up
        return {"step": step + 1, "loss": read.loss, "lr": lr, "grad_norm": read.grad_norm,
                "loss_scale": read.loss_scale, "skipped": read.skipped,
                "skipped_steps": self.skipped_steps, "global_batch_size": batch,
                "consumed_samples": consumed, "tokens": consumed * self.model_cfg.seq_len,
                **interval,
                **throughput(interval["step_time_s"], mean_batch, self.model_cfg.seq_len,
                             self.flops_per_step * share, self.hardware_flops_per_step * share,
                             self.grid.world_size, self.peak_tflops),
                "peak_memory_gb": read.peak_memory / 2**30,
                "peak_memory_gb_max_rank": read.peak_memory_max / 2**30}

    def check_finite(self, record: dict) -> None:
        """bf16/fp32 have no loss scale to lower: a non-finite loss or gradient norm skips the
        update (the optimizer already did) and, past train.max_skipped_steps in a row, stops
        every rank at once (they all hold the same global loss and norm) without saving."""
        if self.over_limit_at is None:
            return  # fp16 never sets it: its loss scaler skips, lowers the scale, stops
        in_a_row = int(self.cfg.train.max_skipped_steps) + 1
        latest = self.checkpointer.last_saved or self.checkpointer.resumed_from
        raise NonFiniteError(
            f"step {record['step']}: loss {record['loss']} or gradient norm "
            f"{record['grad_norm']} is not finite ({in_a_row} such steps in a row); the update "
            f"was skipped and nothing was saved (last good checkpoint: {latest or 'none'}); "
            f"lower optim.lr, check the data, or allow skips with train.max_skipped_steps")

    def evaluate_all(self) -> dict:
        """Validation loss and perplexity, and the train.eval_tasks scores."""
        val_loss = self.evaluate()
        scores = {"val_loss": val_loss,
                  "val_ppl": math.exp(min(val_loss, 50.0))}  # capped: exp overflows past ~709
        if self.cfg.train.get("eval_tasks"):
            scores.update(score_during_training(
                self.model_chunks, self.grid, self.cfg.data.tokenizer,
                OmegaConf.to_container(self.cfg.train.eval_tasks, resolve=True)))
        return scores

    def sample(self) -> str:
        """The end-of-run sample from the final weights (train.sample), as a printable line."""
        c = self.cfg.train
        text = sample_after_training(self.model_chunks, self.grid, self.cfg.data.tokenizer,
                                     str(c.sample_prompt), int(c.sample_tokens),
                                     float(c.sample_temperature), int(c.seed))
        return f"nanomt sample:\n{text}"

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over `train.eval_batches` fixed validation batches of global_batch_size
        sequences: the same sequences, split the same way, under every layout."""
        chunks = self.model_chunks
        for chunk in chunks:
            chunk.eval()
        mbs, grid, G = self.cfg.train.micro_batch_size, self.grid, self.cfg.train.global_batch_size
        loss_sum = torch.zeros((), device=self.device)  # stays on the device: one sync, below
        for inputs, targets in self.val_data.eval_batches(self.cfg.train.eval_batches, G,
                                                          grid.dp_rank, grid.dp_size):
            micro_batches = [self.my_tokens(pair) for pair in zip(inputs.split(mbs),
                                                                  targets.split(mbs))]
            loss_sum += self.forward_backward(chunks, micro_batches, grid,
                                              forward_only=True).float()
        for chunk in chunks:
            chunk.train()
        return float(mean_over_batch(loss_sum, self.num_microbatches *
                                     self.cfg.train.eval_batches, grid, self.device))


def setup(cfg: DictConfig, run_dir: Path) -> Trainer:
    """config -> grid -> checkpoint folder -> model -> schedule -> optimizer -> data -> resume."""
    _, world_size, _ = init_distributed(cfg.parallel.timeout_s, cfg.parallel.init_timeout_s,
                                        use_cuda=cfg.train.device != "cpu")
    faults.inject("start")
    model_cfg, layout, num_microbatches = check_launch(cfg, world_size)
    device = pick_device(cfg.train.device)
    if device.type == "cuda":  # fp32 matmuls on tensor cores (TF32) unless train.tf32=false
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(
            cfg.train.get("tf32", True))
    grid = ParallelGrid(layout.tp, layout.pp, layout.dp, timeout_s=cfg.parallel.timeout_s,
                        cp=layout.cp)
    seed_everything(cfg.train.seed, grid.pp_rank)
    checkpointer = Checkpointer(cfg, run_dir, model_cfg, layout, grid, device)
    checkpointer.check_folder()  # writable and shared by every rank, before anything is built

    # On the meta device: build_optimizer draws each tensor into its bucket (ZeRO-3: its shard)
    model_chunks = build_model(model_cfg, layout, grid, cfg.train.seed, torch.device("meta"))
    set_activation_checkpointing(model_chunks, cfg.train.activation_checkpointing)
    forward_backward = get_forward_backward_func(layout, cfg.parallel.schedule)
    timeline = Timeline({"rank": grid.rank, "pp_rank": grid.pp_rank, "tp_rank": grid.tp_rank,
                         "dp_rank": grid.dp_rank, "pp": layout.pp,
                         "virtual_stages": layout.virtual_stages,
                         "num_microbatches": num_microbatches},
                        cuda_events=device.type == "cuda") if cfg.train.timeline else None
    # Data parallelism (gradient buckets reduced during backward, ZeRO sharding) is the
    # optimizer's buffer; the optimizer holds the fp32 shard state (nanomt.optim.build).
    optimizer = build_optimizer(model_chunks, cfg, grid, device=device)
    o = cfg.optim
    train_data, val_data = build_data(cfg, model_cfg)
    # the LR schedule counts steps, samples or tokens (optim.schedule_unit; same with ramp-up)
    position = schedule_position(str(o.get("schedule_unit", "steps")),
                                 train_data.consumed_before, model_cfg.seq_len)
    lr_curve = WarmupCosine(o.lr, o.min_lr, o.warmup_steps,
                            o.decay_steps or position(cfg.train.steps))
    lr_at = lambda step: lr_curve(position(step))  # noqa: E731
    start_step = checkpointer.resume(model_chunks, optimizer, train_data)  # 0 unless train.resume
    G, recompute = cfg.train.global_batch_size, str(cfg.train.activation_checkpointing)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Trainer(cfg, run_dir, model_cfg, layout, grid, device, num_microbatches, model_chunks,
                   forward_backward, optimizer, lr_at, train_data, val_data, checkpointer,
                   timeline, start_step,
                   flops_per_step=flops_per_iteration(model_cfg, G),
                   hardware_flops_per_step=hardware_flops_per_iteration(model_cfg, G, recompute),
                   peak_tflops=peak_tflops(device_name, cfg.logging.get("peak_tflops"),
                                           str(cfg.train.precision)))


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
        "model_parameters": t.model_cfg.num_parameters(), "ranks": ranks,
        "started": datetime.now().isoformat(timespec="seconds")})
    return ranks


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
    logger.print(f"nanomt: {t.model_cfg.num_parameters():,} parameters, layout tp={layout.tp} "
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
                record.update(t.evaluate_all())
                val_loss = record["val_loss"]
            logger.log_step(record)
            t.check_finite(record)
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
        logger.print(t.sample())
    seq_len, consumed = t.model_cfg.seq_len, t.train_data.consumed_before  # ramp-up aware
    tokens_this_launch = (consumed(steps_done) - consumed(t.start_step)) * seq_len
    summary = {"steps": steps_done, "final_loss": record["loss"], "val_loss": val_loss,
               "tokens": consumed(steps_done) * seq_len, "time_s": elapsed,
               "tokens_per_s": tokens_this_launch / max(elapsed, 1e-9),
               "stopped_by": t.checkpointer.stopped_by, "skipped_steps": t.skipped_steps,
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
