"""Global gradient-norm clipping over a model split across tp, pp and dp ranks.

    ||g|| = sqrt( sum over every parameter of the whole model, counted exactly once, of ||g_p||^2 )

A tensor-parallel shard contributes its own squares; a tensor replicated on every tp rank
(norms, row-parallel biases, position embeddings) is counted on tp rank 0 only; a tied word
embedding kept on both the first and last pipeline stage is counted on the first only. The
partial sums are then added over the model-parallel group (tp x pp). Data-parallel replicas hold
identical (all-reduced) gradients and are not added again; sharded gradients (ZeRO-2/3) pass
`dp_sharded=True` and are summed over dp too.
"""

from __future__ import annotations

import torch

from nanomt.parallel import comm


def counted_once(param: torch.nn.Parameter, tp_rank: int, is_first_stage: bool) -> bool:
    if getattr(param, "tp_split_dim", None) is None and tp_rank != 0:
        return False
    if getattr(param, "shared_embedding", False) and not is_first_stage:
        return False  # the last stage's copy of the tied embedding
    return True


def global_grad_norm(params: list[torch.nn.Parameter], grid, dp_sharded: bool = False,
                     grads: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The L2 norm of the whole model's gradient (fp32 scalar, equal on every rank)."""
    tp_rank = grid.tp_rank if grid is not None else 0
    first = grid.is_first_stage if grid is not None else True
    if grads is None:
        grads = [p.grad for p in params]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for param, grad in zip(params, grads):
        if grad is not None and counted_once(param, tp_rank, first):
            total += grad.detach().float().pow(2).sum()
    if grid is not None:
        comm.all_reduce(total, grid.model_parallel_group)
        if dp_sharded:
            comm.all_reduce(total, grid.dp_group)
    return total.sqrt()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, grid,
                   dp_sharded: bool = False) -> float:
    """Scale every gradient by min(1, max_norm / ||g||); returns ||g|| before clipping."""
    norm = global_grad_norm(params, grid, dp_sharded)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for param in params:
            if param.grad is not None:
                param.grad.detach().mul_(coef.to(param.grad.device))
    return float(norm)
