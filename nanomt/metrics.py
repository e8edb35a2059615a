"""What one training step measures, and which rank reports it.

Throughput, per step of B_t sequences of s tokens on N devices taking T seconds:

    tokens/s          = B_t s / T
    TFLOP/s per GPU   = F_hw(B_t) / (T N) / 1e12   hardware FLOPs: recompute counted (the paper's)
    model TFLOP/s     = F_model(B_t) / (T N) / 1e12 model FLOPs: the model once (nanomt.flops)
    MFU               = model TFLOP/s / peak TFLOP/s per GPU (logging.peak_tflops, or the table
                        of known GPUs in nanomt.flops; null when neither knows the device)

One rank reports: the last pipeline stage's tp rank 0 and cp rank 0 of dp replica 0. It holds
the loss before any reduction and is the rank Megatron logs from; every other rank is silent.
"""

from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as dist

from nanomt.parallel import comm
from nanomt.parallel.grid import ParallelGrid

# Every key a training step's record carries (val_loss and val_ppl only on evaluation steps;
# mfu null when no peak is known); tests check a run's metrics.jsonl against this list. A record
# covers interval_steps steps (logging.metrics_interval; nanomt.records): loss,
# grad_norm and skipped are its own step's, loss_mean, skipped_in_interval and the throughput
# the interval's.
STEP_METRICS = ("step", "loss", "lr", "grad_norm", "loss_scale", "skipped", "skipped_steps",
                "global_batch_size", "consumed_samples", "tokens", "interval_steps", "loss_mean",
                "skipped_in_interval", "step_time_s", "tokens_per_s", "tflops_per_gpu",
                "model_tflops_per_gpu", "mfu", "peak_memory_gb", "peak_memory_gb_max_rank")
EVAL_METRICS = ("val_loss", "val_ppl")
# A model with experts (model.moe) adds these, and moe_expert_load/layer_<i> per MoE layer i
# (max / mean assignments per expert over the step's batch; nanomt.model.moe).
MOE_METRICS = ("moe_aux_loss", "moe_z_loss")


def is_logging_rank(grid: ParallelGrid) -> bool:
    """The one rank that writes metrics, the progress bar and W&B."""
    return grid.is_last_stage and grid.tp_rank == 0 and grid.cp_rank == 0 and grid.dp_rank == 0


def throughput(step_time_s: float, batch: int, seq_len: int, model_flops: float,
               hardware_flops: float, num_devices: int, peak_tflops: float | None) -> dict:
    """The step's throughput metrics (module docstring); FLOPs are those of the step's batch."""
    per_device = step_time_s * num_devices * 1e12
    record = {"tokens_per_s": batch * seq_len / step_time_s,
              "tflops_per_gpu": hardware_flops / per_device,
              "model_tflops_per_gpu": model_flops / per_device}
    record["mfu"] = record["model_tflops_per_gpu"] / peak_tflops if peak_tflops else None
    return record


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held: the CUDA allocator's peak, or on CPU the peak
    resident set size (the whole process: interpreter and libraries included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux reports KiB


def host_values_to(device: torch.device, values: list[float],
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`values` as a tensor on `device` without waiting for the GPU: a copy from pageable memory
    waits for the device's queue to drain (a second sync in every step); one staged in
    pinned memory and copied with non_blocking=True is queued behind the step's work instead."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def max_over_ranks(values: list[float], grid: ParallelGrid, device: torch.device,
                   on_device: torch.Tensor | None = None) -> torch.Tensor:
    """The largest of each of `values` (host numbers), then of each of `on_device` (a 1-d
    tensor on `device`), over every rank, as one float64 tensor on `device` (no host read: the
    trainer reads it with the step's other values): over the model-parallel (tp x pp) group,
    then over the dp x cp ranks of each position."""
    tensor = host_values_to(device, values)
    if on_device is not None:
        tensor = torch.cat([tensor, on_device.double()])
    if grid.is_distributed:
        comm.all_reduce(tensor, grid.model_parallel_group, op=dist.ReduceOp.MAX)
        comm.all_reduce(tensor, grid.grad_sync_group, op=dist.ReduceOp.MAX)
    return tensor
