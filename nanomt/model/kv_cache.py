"""The key/value cache of autoregressive generation: attend to the past without recomputing it.

A causal decoder's keys and values at position i depend only on tokens 0..i, so once computed
they never change. Generation keeps them per layer and, at each step, runs only the new tokens:

    K_cache <- [K_cache ; K_new],  V_cache <- [V_cache ; V_new]
    out_new  = softmax(Q_new K_cache^T / sqrt(d) + M) V_cache,   M[i, j] = -inf if j > past + i

so a step costs O(new tokens x cached tokens) instead of re-running the whole prefix. Under tensor
parallelism each rank caches only its own heads (the cache is as sharded as the attention); under
pipeline parallelism each stage caches only its own layers. Positions (learned or rotary) start
at `length`, the number of tokens already cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LayerKVCache:
    """One attention layer's keys and values [b, heads/t, past, d] of every token seen so far."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' keys and values; return those of all tokens, past and new."""
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)
            values = torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The new tokens' queries against the cached and new keys (after appending k, v):
        query i sits at position past + i and sees keys 0 .. past + i."""
        past = self.length
        k, v = self.append(k, v)
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible.tril(diagonal=past))


class KVCache:
    """The caches of every layer this rank holds (keyed by global layer index), and `length`:
    how many positions they already hold, where the next forward's tokens start."""

    def __init__(self) -> None:
        self.layers: dict[int, LayerKVCache] = {}
        self.length = 0

    def layer(self, index: int) -> LayerKVCache:
        return self.layers.setdefault(index, LayerKVCache())

    def advance(self, num_tokens: int) -> None:
        """Called once the whole model has run on `num_tokens` new positions."""
        self.length += num_tokens
