"""The training step: setup builds everything once; `Trainer.train_step` runs one optimizer step.

One optimizer step over a global batch of G sequences: every dp rank runs its m = G / (b * dp)
micro-batches through the model (gradient accumulation, or a pipeline schedule), gradients are
reduced over dp, clipped by their global norm, and AdamW updates the weights:

    zero_grad -> schedule (forward + backward of m micro-batches) -> finalize_grads
              -> clip by the global norm -> one host read -> AdamW step
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from nanomt import faults
from nanomt.checkpoint.checkpointer import Checkpointer
from nanomt.config import Layout
from nanomt.data import GlobalBatchSampler
from nanomt.data.build import build_samplers
from nanomt.step_read import read_step
from nanomt.launch_checks import check_launch
from nanomt.memory import PeakMemoryMeter
from nanomt.model import GPT, ModelConfig
from nanomt.model.checkpointing import set_activation_checkpointing
from nanomt.model.chunks import build_model_chunks
from nanomt.model.moe import set_aux_loss_scale, step_statistics
from nanomt.optim import build_optimizer
from nanomt.optim.schedule import learning_rate_at
from nanomt.parallel import comm
from nanomt.parallel.context_parallel import split_sequence
from nanomt.parallel.data_parallel import finalize_grads
from nanomt.parallel.forward_backward import get_forward_backward_func
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.launch import init_distributed
from nanomt.parallel.pipeline import Timeline
from nanomt.parallel.random import seed_everything
from nanomt.records import StepRecords


def to_device(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch onto `device`; to a GPU from pinned memory, without blocking the host."""
    if device.type != "cuda":
        return tokens.to(device)
    return tokens.pin_memory().to(device, non_blocking=True)


def mean_over_batch(loss_sum: torch.Tensor, num_microbatches: int, grid: ParallelGrid,
                    device: torch.device) -> torch.Tensor:
    """The global batch's mean loss [1] on every rank (only the last chunk's rank holds a loss),
    on the device: NCCL has no CPU path, and the step's one read comes later."""
    loss = loss_sum.to(device=device, dtype=torch.float32).reshape(1) / num_microbatches
    comm.all_reduce(loss, grid.pp_group)  # from the stage with the last chunk (zero elsewhere)
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
    lr_at: Callable[[int], float]
    train_data: GlobalBatchSampler
    val_data: GlobalBatchSampler
    checkpointer: Checkpointer
    timeline: Timeline | None
    start_step: int
    records: StepRecords      # which steps write a metrics record, and what it holds
    preempted: bool = False   # some rank got the preemption signal (read with the last step)

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
        """Inputs and labels on the device (under cp, this rank's two chunks of each one)."""
        grid = self.grid
        return tuple(to_device(split_sequence(t, 1, grid.cp_rank, grid.cp_size), self.device)
                     for t in micro_batch)

    def train_step(self, step: int, measure: PeakMemoryMeter) -> dict | None:
        """One optimizer step over the global batch of `step`; returns its metrics record, or
        None on a step that writes none (nanomt.records). Each phase is one call; the step reads
        the device once, between clipping and the update (nanomt.step_read.read_step)."""
        self.records.interval.start_step()
        faults.inject("step", step + 1)
        micro_batches = self.micro_batches(self.train_data, step)
        optimizer = self.optimizer
        optimizer.zero_grad(num_microbatches=len(micro_batches))
        if self.timeline is not None:
            self.timeline.begin_step(step + 1)
        # the router's losses (mixture of experts) enter backward with each loss's scale
        set_aux_loss_scale(self.model_chunks, optimizer.loss_scale / len(micro_batches))
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
        router_sums = step_statistics(self.model_chunks, self.model_cfg,  # MoE; else None
                                      (self.grid.dp_size, self.grid.cp_size), self.device)
        read = read_step(step + 1, totals, loss, self.grid, self.device,  # the one host read
                         self.checkpointer.preemption.received, optimizer.loss_scaler,
                         router_sums)
        self.preempted = read.preempted
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step(read.grad_norm, read.skipped)  # AdamW on my shards unless inf/nan
        return self.records.after_step(step, read, lr, self.train_data, self.checkpointer)


def setup(cfg: DictConfig, run_dir: Path) -> Trainer:
    """config -> grid -> checkpoint folder -> model -> schedule -> optimizer -> data -> resume."""
    _, world_size, device = init_distributed(
        cfg.parallel.timeout_s, cfg.parallel.init_timeout_s, use_cuda=cfg.train.device != "cpu",
        tf32=bool(cfg.train.get("tf32", True)))
    faults.inject("start")
    model_cfg, layout, num_microbatches = check_launch(cfg, world_size)
    grid = ParallelGrid(layout.tp, layout.pp, layout.dp, timeout_s=cfg.parallel.timeout_s,
                        cp=layout.cp, ep=layout.ep)
    seed_everything(cfg.train.seed, grid.pp_rank)
    checkpointer = Checkpointer(cfg, run_dir, model_cfg, layout, grid, device)
    checkpointer.check_folder()  # writable and shared by every rank, before anything is built

    # On the meta device: build_optimizer draws each tensor into its bucket (ZeRO-3: its shard)
    model_chunks = build_model_chunks(model_cfg, grid, layout.virtual_stages, seed=cfg.train.seed,
                                      sequence_parallel=layout.sequence_parallel,
                                      device=torch.device("meta"), schedule=cfg.parallel.schedule)
    set_activation_checkpointing(model_chunks, cfg.train.activation_checkpointing)
    forward_backward = get_forward_backward_func(layout, cfg.parallel.schedule)
    timeline = Timeline.of_rank(grid, layout.virtual_stages, num_microbatches, device,
                                str(cfg.parallel.schedule)) if cfg.train.timeline else None
    # Data parallelism (gradient buckets reduced during backward, ZeRO sharding) is the
    # optimizer's buffer; the optimizer holds the fp32 shard state (nanomt.optim.build).
    optimizer = build_optimizer(model_chunks, cfg, grid, device=device)
    train_data, val_data = build_samplers(cfg, model_cfg.seq_len)  # checked by check_launch
    lr_at = learning_rate_at(cfg.optim, cfg.train.steps, train_data.consumed_before,
                             model_cfg.seq_len)
    start_step = checkpointer.resume(model_chunks, optimizer, train_data)  # 0 unless train.resume
    return Trainer(cfg, run_dir, model_cfg, layout, grid, device, num_microbatches, model_chunks,
                   forward_backward, optimizer, lr_at, train_data, val_data, checkpointer,
                   timeline, start_step, StepRecords(cfg, model_cfg, grid.world_size, device))
