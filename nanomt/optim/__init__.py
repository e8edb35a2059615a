"""Optimization: AdamW (flat and per group), the LR schedule, the global gradient norm, fp16 loss
scaling, and ShardedAdamW, the optimizer over a data-parallel gradient buffer's shards."""

from nanomt.optim.build import PRECISION_DTYPES, build_optimizer, cast_to_precision
from nanomt.optim.sharded_adamw import ShardedAdamW, StepResult

__all__ = ["PRECISION_DTYPES", "ShardedAdamW", "StepResult", "build_optimizer",
           "cast_to_precision"]
