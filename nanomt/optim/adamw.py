"""AdamW with MT-NLG's parameter groups: weight decay on matrices, none on biases and norms."""

from __future__ import annotations

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (ndim >= 2: linears, embeddings) decay; vectors (biases, norm gains) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float) -> torch.optim.AdamW:
    # foreach=False: the reference per-tensor loop, so results do not depend on how tensors
    # happen to be grouped (keeps single-process and sharded runs bitwise comparable).
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             foreach=False)
