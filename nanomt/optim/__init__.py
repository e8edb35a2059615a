"""Optimization: ShardedAdamW (torch's AdamW over views of a data-parallel gradient buffer's fp32
shards, adamw.py its parameter groups, state_protocol.py what checkpoints and memory reports
read), the global gradient norm and clipping, fp16 loss scaling, and the LR schedule."""

from nanomt.optim.build import PRECISION_DTYPES, build_optimizer, cast_to_precision
from nanomt.optim.sharded_adamw import ShardedAdamW, StepResult

__all__ = ["PRECISION_DTYPES", "ShardedAdamW", "StepResult", "build_optimizer",
           "cast_to_precision"]
