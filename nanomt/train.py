"""Train a GPT with nanomt. Read top to bottom: config -> grid -> model -> optimizer -> data -> loop.

    python -m nanomt.train                                   # tiny model, embedded corpus, CPU
    python -m nanomt.train model=gpt_125m data.tokenizer=gpt2 train.steps=1000
    torchrun --standalone --nproc_per_node=4 -m nanomt.train parallel.tp=4

One optimizer step: every data-parallel rank runs its m = G / (b * dp) micro-batches through the
model (gradient accumulation, or a pipeline schedule), gradients are reduced over the dp group,
clipped by their global norm, and AdamW updates the weights.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from nanomt.checkpoint.checkpointer import Checkpointer
from nanomt.config import Layout, check_config
from nanomt.data import GlobalBatchSampler, build_tokenizer, load_token_splits
from nanomt.logger import RunLogger, write_json_atomic
from nanomt.memory import PeakMemoryMeter, memory_report
from nanomt.model import GPT, ModelConfig
from nanomt.model.checkpointing import set_activation_checkpointing
from nanomt.optim.schedule import WarmupCosine
from nanomt.parallel import comm
from nanomt.parallel.grid import ParallelGrid, init_distributed
from nanomt.parallel.random import seed_everything
from nanomt.parallel.zero import build_optimizer
from nanomt.parallel.pipeline import Timeline, build_model_chunks
from nanomt.parallel.schedules import get_forward_backward_func


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                else torch.device("cpu"))
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def build_data(cfg: DictConfig, model_cfg: ModelConfig):
    tokenizer = build_tokenizer(str(cfg.data.tokenizer))
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {cfg.data.tokenizer!r} has {tokenizer.vocab_size} tokens "
                         f"but model.vocab_size is {model_cfg.vocab_size}")
    train_tokens, val_tokens = load_token_splits(str(cfg.data.name), tokenizer,
                                                 cfg.data.val_fraction, cfg.data.cache_dir)
    G, s, seed = cfg.train.global_batch_size, model_cfg.seq_len, cfg.train.seed
    return GlobalBatchSampler(train_tokens, s, G, seed), GlobalBatchSampler(val_tokens, s, G, seed)


def build_model(model_cfg: ModelConfig, layout: Layout, grid: ParallelGrid, seed: int,
                device: torch.device) -> list[GPT]:
    """This rank's model chunks: the whole model, or the v chunks of its pipeline stage."""
    return build_model_chunks(model_cfg, grid, layout.virtual_stages, seed=seed,
                              sequence_parallel=layout.sequence_parallel, device=device)


def describe_ranks(grid: ParallelGrid, model: torch.nn.Module) -> list[dict]:
    """Every rank's coordinates, host and parameter count, gathered onto every rank."""
    mine = {"rank": grid.rank, "tp": grid.tp_rank, "pp": grid.pp_rank, "dp": grid.dp_rank,
            "host": socket.gethostname(),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "layers": [[chunk.layer_range.start, chunk.layer_range.stop] for chunk in model]}
    if not grid.is_distributed:
        return [mine]
    everyone: list = [None] * grid.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def mean_over_batch(loss_sum: torch.Tensor, num_microbatches: int, grid: ParallelGrid) -> float:
    """The global batch's mean loss, known on every rank (only last stages hold a loss)."""
    loss = loss_sum.float().reshape(1) / num_microbatches
    if not grid.is_last_stage:
        loss.zero_()
    comm.all_reduce(loss, grid.pp_group)  # from the last stage to all stages
    comm.all_reduce(loss, grid.dp_group)
    return float(loss) / grid.dp_size


def evaluate(model: torch.nn.ModuleList, val_data: GlobalBatchSampler, cfg: DictConfig,
             grid: ParallelGrid, device: torch.device, forward_backward) -> float:
    model.eval()
    batches = [(x.to(device), y.to(device)) for x, y in val_data.eval_batches(
        cfg.train.eval_batches, cfg.train.micro_batch_size * grid.dp_size,
        grid.dp_rank, grid.dp_size)]
    loss_sum = forward_backward(list(model), batches, grid, forward_only=True)
    model.train()
    return mean_over_batch(loss_sum, len(batches), grid)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole training run; returns the summary. Callable without Hydra (tests do)."""
    # -- config and grid --------------------------------------------------------------------
    rank, world_size, _ = init_distributed(cfg.parallel.timeout_s)
    model_cfg, layout, num_microbatches = check_config(cfg, world_size)
    device = pick_device(cfg.train.device)
    grid = ParallelGrid(layout.tp, layout.pp, layout.dp, timeout_s=cfg.parallel.timeout_s)
    seed_everything(cfg.train.seed, grid.pp_rank)

    # -- model, optimizer, schedule, data ---------------------------------------------------
    model_chunks = build_model(model_cfg, layout, grid, cfg.train.seed, device)
    model = torch.nn.ModuleList(model_chunks)  # one module over this rank's chunks
    forward_backward = get_forward_backward_func(layout, cfg.parallel.schedule)
    timeline = Timeline({"rank": grid.rank, "pp_rank": grid.pp_rank, "tp_rank": grid.tp_rank,
                         "dp_rank": grid.dp_rank, "pp": layout.pp,
                         "virtual_stages": layout.virtual_stages,
                         "num_microbatches": num_microbatches}) if cfg.train.timeline else None
    set_activation_checkpointing(model_chunks, cfg.train.activation_checkpointing)
    o = cfg.optim
    # Data parallelism lives in the optimizer: gradient buckets reduced during backward, ZeRO
    # sharding (parallel.zero_stage), precision, clipping and AdamW (nanomt.parallel.zero).
    optimizer = build_optimizer(model_chunks, cfg, grid)
    lr_at = WarmupCosine(o.lr, o.min_lr, o.warmup_steps, o.decay_steps or cfg.train.steps)
    train_data, val_data = build_data(cfg, model_cfg)
    checkpointer = Checkpointer(cfg, run_dir, model_cfg, layout, grid, device)
    start_step = checkpointer.resume(model_chunks, optimizer, train_data)  # 0 unless train.resume

    # -- run folder --------------------------------------------------------------------------
    is_writer = rank == 0
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ranks = describe_ranks(grid, model)
    if is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "run.json", {
            "config": resolved, "world_size": world_size,
            "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
                       "virtual_stages": layout.virtual_stages,
                       "schedule": str(cfg.parallel.schedule),
                       "sequence_parallel": layout.sequence_parallel,
                       "zero_stage": layout.zero_stage},
            "num_microbatches": num_microbatches,
            "model_parameters": model_cfg.num_parameters(),
            "ranks": ranks, "started": datetime.now().isoformat(timespec="seconds")})
    steps = cfg.train.steps
    logger = RunLogger(run_dir, is_writer, steps, start_step, resolved["logging"]["wandb"],
                       resolved, cfg.train.progress_bar)
    logger.print(f"nanomt: {model_cfg.num_parameters():,} parameters, layout tp={layout.tp} "
                 f"pp={layout.pp} dp={layout.dp}, {num_microbatches} micro-batches/step, "
                 f"run folder {run_dir}")
    if checkpointer.resumed_from:
        logger.print(f"resumed from {checkpointer.resumed_from} at step {start_step}")

    # -- the loop ----------------------------------------------------------------------------
    tokens_per_step = cfg.train.global_batch_size * model_cfg.seq_len
    loss = val_loss = float("nan")
    steps_done = start_step
    t_start = time.perf_counter()
    activation_meter = PeakMemoryMeter()  # watches the first step's forward and backward
    model.train()
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [
            tuple(t.to(device) for t in train_data.micro_batch(
                step, i, grid.dp_rank, grid.dp_size, cfg.train.micro_batch_size))
            for i in range(num_microbatches)]

        optimizer.zero_grad(set_to_none=True)
        if timeline is not None:
            timeline.begin_step(step + 1)
        with activation_meter.watch(step == start_step and cfg.train.measure_memory):
            loss_sum = forward_backward(model_chunks, micro_batches, grid, timeline=timeline)
        result = optimizer.step()  # reduce, clip by the global norm, update (or skip: fp16)
        grad_norm = result.grad_norm

        loss = mean_over_batch(loss_sum, num_microbatches, grid)
        step_time = time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": (step + 1) * tokens_per_step, "step_time_s": step_time,
                  "tokens_per_s": tokens_per_step / step_time, "skipped": result.skipped}
        eval_interval = cfg.train.eval_interval
        if (eval_interval and (step + 1) % eval_interval == 0) or step + 1 == steps:
            val_loss = evaluate(model, val_data, cfg, grid, device, forward_backward)
            record["val_loss"] = val_loss
        logger.log_step(record)
        steps_done = step + 1
        if checkpointer.after_step(steps_done, model_chunks, optimizer, train_data, lr):
            break  # train.exit_after reached, or SIGTERM: saved, stop cleanly

    checkpointer.close()
    if timeline is not None:
        timeline.save(run_dir / "timeline" / f"rank{grid.rank}.json")
    elapsed = time.perf_counter() - t_start
    summary = {"steps": steps_done, "final_loss": loss, "val_loss": val_loss,
               "tokens": steps_done * tokens_per_step, "time_s": elapsed,
               "tokens_per_s": (steps_done - start_step) * tokens_per_step / max(elapsed, 1e-9),
               "memory_per_rank": memory_report(optimizer, activation_meter.peak_bytes, grid)}
    logger.finish(summary)
    return summary


def agree_on_run_stamp() -> None:
    """Every rank of a torchrun launch must use the same run folder: rank 0 picks the stamp."""
    if "NANOMT_RUN_STAMP" in os.environ:
        return
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    if dist.is_initialized():
        box = [stamp]
        dist.broadcast_object_list(box, src=0)
        stamp = box[0]
    os.environ["NANOMT_RUN_STAMP"] = stamp


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    init_distributed(float(os.environ.get("NANOMT_INIT_TIMEOUT_S", "300")))
    agree_on_run_stamp()
    try:
        hydra_main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
