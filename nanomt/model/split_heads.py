"""Splitting the fused QKV output into SDPA's q, k, v with one gradient copy instead of two.

The fused QKV weight is laid out per head, rows [head0: q k v | head1: q k v | ...], so that a
contiguous split over tp ranks hands each rank whole heads; q, k and v are then views of its
output. Autograd's own backward of view -> permute -> unbind stacks the three gradients into
[3, b, heads, s, d], then copies that into qkv's [s, b, heads, 3, d] order: two full copies, the
second striding against the cache. `SplitHeads` copies each gradient once, straight to its
place: half the time (docs/performance.md, single_vs_plain). The values are the same.
"""

from __future__ import annotations

import torch


class SplitHeads(torch.autograd.Function):
    """qkv [s, b, heads * 3 * d] (rows per head: q k v) -> q, k, v, each a [b, heads, s, d] view."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, head_dim: int):
        s, b, _ = qkv.shape
        ctx.shape = (s, b, heads, 3, head_dim)
        return qkv.view(ctx.shape).permute(3, 1, 2, 0, 4).unbind(0)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        grad = grad_q.new_empty(ctx.shape)  # (an unused output's gradient arrives as zeros)
        for i, g in enumerate((grad_q, grad_k, grad_v)):
            grad[:, :, :, i].copy_(g.permute(2, 0, 1, 3))  # [b, heads, s, d] -> [s, b, heads, d]
        return grad.flatten(2), None, None
