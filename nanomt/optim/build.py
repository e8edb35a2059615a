"""The run's optimizer from its config: a gradient buffer (data parallelism) and ShardedAdamW.

    optimizer = build_optimizer(model_chunks, cfg, grid)   # parallel.zero_stage, train.precision
    optimizer.zero_grad()                                  # or zero_grad(num_microbatches=m)
    loss_sum = forward_backward(chunks, micro_batches, grid, loss_scale=optimizer.loss_scale)
    finalize_grads(optimizer.buffer)                       # nanomt.parallel.data_parallel
    totals = optimizer.clip_grads()                        # norm and inf/nan verdict, clip
    norm, overflow, _ = read_norm(totals)                  # the one host read (grad_norm.py)
    result = optimizer.step(norm, overflow)                # or step() alone: all of the above

Mixed precision: the model is cast to bf16/fp16 for compute; the fp32 values from before the cast
seed the master weights, which the optimizer keeps for its shard. fp16 adds dynamic loss
scaling: the schedule multiplies each micro-batch's loss by `optimizer.loss_scale` before
backward, and the optimizer divides the gradients by it again (nanomt.optim.loss_scaler).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from nanomt.optim.loss_scaler import DynamicLossScaler
from nanomt.optim.sharded_adamw import ShardedAdamW
from nanomt.parallel.data_parallel import GradientBuffer
from nanomt.parallel.deferred_init import InitialValues, is_on_meta, place_on
from nanomt.parallel.grid import ParallelGrid

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast_to_precision(chunks: list[nn.Module], precision: str) -> dict[int, torch.Tensor]:
    """Cast the model to the compute dtype; return the fp32 values the masters start from (none
    for a model on the meta device: it holds no values yet)."""
    dtype = PRECISION_DTYPES[precision]
    if is_on_meta(chunks):
        for chunk in chunks:
            chunk.to(dtype)  # shapes only; build_optimizer draws the masters when they are made
        return {}
    masters: dict[int, torch.Tensor] = {}
    if dtype == torch.float32:
        return masters
    for chunk in chunks:
        for param in chunk.parameters():
            masters[id(param)] = param.detach().float().clone()
        chunk.to(dtype)
    return masters


def build_optimizer(model_chunks: nn.Module | list[nn.Module], cfg: DictConfig,
                    grid: ParallelGrid | None, num_microbatches: int | None = None,
                    device: torch.device | str | None = None) -> ShardedAdamW:
    """The data-parallel AdamW for the run's config: ZeRO stage, precision, buckets, clipping.

    num_microbatches: backward passes per step (default: global / (micro x dp)); a step with
    another count passes it to optimizer.zero_grad(num_microbatches=...). A model built on the
    meta device is materialised here on `device`, one tensor at a time, in its final dtype
    (nanomt.parallel.deferred_init): only its buckets (under ZeRO-3 its shards) ever exist."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    on_meta = is_on_meta(chunks)
    if on_meta and device is None:
        raise ValueError("build_optimizer: a model on the meta device needs `device`")
    masters = cast_to_precision(chunks, str(cfg.train.precision))
    initial_values = None
    if on_meta:
        place_on(chunks, device)
        masters = initial_values = InitialValues(chunks)  # drawn one tensor at a time
    dp = grid.dp_size if grid is not None else 1
    if num_microbatches is None:
        num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    scaler = None
    if cfg.train.precision == "fp16":
        ls = cfg.train.loss_scale
        scaler = DynamicLossScaler(ls.initial, ls.growth_interval, ls.min)
    p, o = cfg.parallel, cfg.optim
    buffer = GradientBuffer(chunks, grid, zero_stage=int(p.zero_stage),
                            num_microbatches=num_microbatches,
                            bucket_size_mb=float(p.bucket_size_mb),
                            fp32_grads=bool(cfg.train.get("fp32_grads", True)),
                            grad_reduce=str(p.get("grad_reduce", "step")),
                            zero3_prefetch=int(p.get("zero3_prefetch", 1)),
                            reduce_in_flight_mb=p.get("reduce_in_flight_mb"),
                            overlap_param_gather=bool(p.get("overlap_param_gather", False)),
                            initial_values=initial_values)
    return ShardedAdamW(buffer, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                        weight_decay=o.weight_decay, grad_clip=o.grad_clip,
                        master_params=masters, loss_scaler=scaler)
