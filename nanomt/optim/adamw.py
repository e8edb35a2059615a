"""AdamW (Loshchilov & Hutter 2019), weight decay on matrices only: torch.optim.AdamW, told
which tensors it sees in which group. Per element, with gradient g at step t:

    w <- w (1 - lr wd)                                   decoupled decay (matrices only)
    m <- b1 m + (1 - b1) g        v <- b2 v + (1 - b2) g^2
    w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Under ZeRO the tensors are per-parameter views of this rank's fp32 shard (as Megatron's
distributed optimizer); the update is element-wise, so shard boundaries change no number.
Kernels: `fused` on CUDA (one pass, nothing read to the host); `foreach` on CPU, where the fused
kernel would round an element by its place in the shard. Measured on 2 CPU cores (run_all's
3.3M-parameter model): 16-19 ms a step against 12-15 ms for the hand-written update it
replaced, under 1% of the 0.63 s step; on CUDA one pass where that made ten.
"""

from __future__ import annotations

import torch
from torch import nn

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch.optim.AdamW's state, besides its step count


def decays(param: torch.Tensor) -> bool:
    """Matrices (linears, embeddings) decay; vectors (biases, norm gains) do not."""
    return param.ndim >= 2


def build_adamw(pieces: list[tuple[nn.Parameter, torch.Tensor]], *, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float
                ) -> torch.optim.AdamW:
    """torch.optim.AdamW over `pieces`: (model parameter, the fp32 tensor updated for it), in
    two groups, decay then no decay. `pieces` may be empty (a rank whose shards hold only
    padding): its step does nothing."""
    groups = [{"params": [t for param, t in pieces if decays(param)],
               "weight_decay": weight_decay},
              {"params": [t for param, t in pieces if not decays(param)], "weight_decay": 0.0}]
    on_cuda = any(t.device.type == "cuda" for _, t in pieces)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps,
                             foreach=not on_cuda, fused=on_cuda)
