"""ZeRO data parallelism (Rajbhandari et al. 2019), written on torch.distributed.

    optimizer = build_optimizer(model_chunks, cfg, grid)   # parallel.zero_stage, train.precision
    optimizer.zero_grad()                                  # or zero_grad(num_microbatches=m)
    ... forward/backward of every micro-batch (any schedule) ...
    result = optimizer.step()                              # result.grad_norm, result.skipped

Gradients: bf16/fp16 ones are accumulated and reduced in fp32 (train.fp32_grads); ZeRO-2/3
reduce-scatter every micro-batch and keep only the shard (parallel.grad_reduce=microbatch) or
once per step after full-size accumulation (step); see optimizer.py.

Files: buckets.py (flat buffers, shards), optimizer.py (hooks, reductions, AdamW on the shard),
stage3.py (gather/free parameters around each layer), state.py (checkpoint state).

Checkpoint API (layout-independent, per parameter; details in state.py):
    optimizer.checkpoint_state() -> [(param, state_name, fp32 tensor, (lo, hi))]: the pieces of
        "exp_avg", "exp_avg_sq" (and "master" under bf16/fp16) that my shard holds, [lo, hi) a
        range of the flattened (tp-local) parameter.
    optimizer.load_checkpoint_state(read): read(param, state_name, (lo, hi)) -> tensor.
    optimizer.scalar_state() / load_scalar_state(): {"step", "loss_scaler"}.
    with optimizer.full_parameters(writeback=...): ZeRO-3 parameters materialised inside.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from nanomt.optim.loss_scaler import DynamicLossScaler
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.zero.optimizer import StepResult, ZeroOptimizer

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast_to_precision(chunks: list[nn.Module], precision: str) -> dict[int, torch.Tensor]:
    """Cast the model to the compute dtype; return the fp32 values the masters start from."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"train.precision must be one of {tuple(PRECISION_DTYPES)}, "
                         f"got {precision!r}")
    dtype = PRECISION_DTYPES[precision]
    masters: dict[int, torch.Tensor] = {}
    if dtype == torch.float32:
        return masters
    for chunk in chunks:
        for param in chunk.parameters():
            masters[id(param)] = param.detach().float().clone()
        chunk.to(dtype)
    return masters


def build_optimizer(model_chunks: nn.Module | list[nn.Module], cfg: DictConfig,
                    grid: ParallelGrid | None,
                    num_microbatches: int | None = None) -> ZeroOptimizer:
    """The data-parallel AdamW for the run's config: ZeRO stage, precision, buckets, clipping.

    num_microbatches: backward passes per step (default: global / (micro x dp)); a step with
    another count passes it to optimizer.zero_grad(num_microbatches=...)."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    masters = cast_to_precision(chunks, str(cfg.train.precision))
    dp = grid.dp_size if grid is not None else 1
    if num_microbatches is None:
        num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    scaler = None
    if cfg.train.precision == "fp16":
        ls = cfg.train.loss_scale
        scaler = DynamicLossScaler(ls.initial, ls.growth_interval, ls.min)
    o = cfg.optim
    optimizer = ZeroOptimizer(
        chunks, grid, zero_stage=int(cfg.parallel.zero_stage), lr=o.lr,
        betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip,
        num_microbatches=num_microbatches, bucket_size_mb=float(cfg.parallel.bucket_size_mb),
        master_params=masters, loss_scaler=scaler,
        fp32_grads=bool(cfg.train.get("fp32_grads", True)),
        grad_reduce=str(cfg.parallel.get("grad_reduce", "microbatch")),
        zero3_prefetch=int(cfg.parallel.get("zero3_prefetch", 1)))
    if scaler is not None:
        for chunk in chunks:  # the chunk that returns the loss scales it for backward
            chunk.register_forward_hook(
                lambda module, args, out: optimizer.scale_loss(out)
                if isinstance(out, torch.Tensor) and out.dim() == 0 and out.requires_grad
                else None)
    return optimizer


__all__ = ["StepResult", "ZeroOptimizer", "build_optimizer", "cast_to_precision"]
