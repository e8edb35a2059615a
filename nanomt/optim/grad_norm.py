"""Global gradient-norm clipping over a model split across tp, pp and dp ranks.

    ||g|| = sqrt( sum over every parameter of the whole model, counted exactly once, of ||g_p||^2 )
    g <- g * min(1, max_norm / (||g|| + 1e-6))

A tp shard adds its own squares; a tensor replicated over tp counts on tp rank 0 only, the tied
embedding on the first stage only; partial sums are added over tp x pp, and over dp x cp
between ZeRO shards. Experts' weights differ across the ep ranks and are sharded (or replicated,
at ZeRO-0) over expert_dp_group: the dp x cp ranks hold each expert element once (ZeRO) or
expert_dp_group's rank 0 counts it, so the same sum over dp x cp counts each once.
The same all-reduce sums an inf/nan carrier, so every rank agrees on an overflow.
All stays on the device until `read_norm`, the step's one host read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from nanomt.parallel import comm
from nanomt.parallel.param_info import param_info

if TYPE_CHECKING:
    from nanomt.parallel.grid import ParallelGrid


def counted_once(param: nn.Parameter, tp_rank: int) -> bool:
    """Whether this rank's copy of `param` is the one that counts in the global norm."""
    info = param_info(param)
    if info.tp_split_dim is None and tp_rank != 0:
        return False
    return info.primary  # not the last stage's copy of the tied embedding


def squares_and_verdict(pieces: list[tuple[nn.Parameter, torch.Tensor]], device: torch.device,
                        grid: ParallelGrid | None, dp_group: dist.ProcessGroup | None = None,
                        count_squares: bool | list[bool] = True) -> torch.Tensor:
    """[sum of squares of the whole gradient, inf/nan exactly when some rank's is]: fp32 on
    `device` (NCCL reduces device tensors only), equal on every rank. pieces: (parameter, its
    gradient or a slice) on this rank; count_squares, for all pieces or per piece: False, only
    report inf/nan (a replica another rank counts).
    A piece's norm is inf/nan exactly when the piece holds one, so the norms' sum is the verdict.
    """
    tp_rank = grid.tp_rank if grid is not None else 0
    totals = torch.zeros(2, dtype=torch.float32, device=device)  # [sum of squares, inf/nan]
    wanted = count_squares if isinstance(count_squares, list) else [count_squares] * len(pieces)
    counts = [want and counted_once(param, tp_rank) for (param, _), want in zip(pieces, wanted)]
    counted = [grad for (_, grad), count in zip(pieces, counts) if count]
    others = [grad for (_, grad), count in zip(pieces, counts) if not count]
    # fp64: other groupings of the same squares (other shards, layouts) agree well below fp32's
    # rounding. Split on the host: a mask on the device would be a copy that waits for it.
    norms = [torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))
             for grads in (counted, others) if grads]
    if counted:
        totals[0] = norms[0].pow(2).sum().float()
    if norms:
        totals[1] = sum(n.sum() for n in norms).float()
    comm.all_reduce(totals, dp_group)
    if grid is not None:
        comm.all_reduce(totals, grid.model_parallel_group)
    return totals


def clip_(grads: list[torch.Tensor], totals: torch.Tensor, max_norm: float) -> None:
    """g <- g * min(1, max_norm / (||g|| + 1e-6)) on the device (an inf/nan norm makes them nan:
    the step is then skipped anyway)."""
    if max_norm > 0 and grads:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (totals[0].sqrt() + 1e-6), max=1.0))


def read_norm(totals: torch.Tensor, along: torch.Tensor | None = None
              ) -> tuple[float, bool, list[float]]:
    """One host read of the totals: (||g||, whether any rank holds an inf/nan gradient, the
    values of `along`, which travel in the same copy)."""
    extra = along.reshape(-1).double() if along is not None else totals.new_empty(0).double()
    sum_of_squares, verdict, *values = torch.cat([totals.double(), extra]).tolist()
    overflow = not (math.isfinite(verdict) and math.isfinite(sum_of_squares))
    return math.sqrt(sum_of_squares), overflow, values
