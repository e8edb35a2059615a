"""Rotary position embeddings (Su et al. 2021), the llama style's positions.

Each pair of query/key features (x[i], x[i + d/2]) at position p is rotated by the angle
p * theta^(-2i/d), so the product of a query at p and a key at p' depends on p - p' only.
"""

from __future__ import annotations

import torch


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [seq_len, head_dim/2] for rotary position embeddings."""
    cpu = torch.device("cpu")  # real tensors even while the model is built on the meta device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=cpu)
                                / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=cpu), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0
               ) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of x [b, heads, s, d] (the "rotate half" convention);
    x's first token sits at position `start` (past tokens held in a KV cache)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    positions = slice(start, start + x.shape[-2])
    cos, sin = cos[positions].to(x.dtype), sin[positions].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
