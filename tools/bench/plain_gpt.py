"""A GPT written minimally in plain PyTorch, of the same shape as nanomt's `style="gpt"` model.

The benchmark's yardstick (not part of nanomt): learned positions, pre-LayerNorm blocks with one
fused QKV linear and a GeLU (tanh) MLP of `ffn_hidden_size`, biases, causal SDPA, a final
LayerNorm and a head tied to the (padded) word embedding, mean cross-entropy. Parameter counts
match nanomt.model.GPT for the same ModelConfig. `tensor_parallel_plan` is the DTensor plan
(torch.distributed.tensor.parallel) that splits it as Megatron does: QKV and fc1 by columns,
the attention output and fc2 by rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, h: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.head_dim = h // heads
        self.norm1, self.norm2 = nn.LayerNorm(h, eps=eps), nn.LayerNorm(h, eps=eps)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under a column split each rank holds heads / t of them
        q, k, v = self.qkv(x).view(b, s, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, s, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self, cfg, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        h, v = cfg.hidden_size, cfg.padded_vocab_size(1)
        self.vocab_size = cfg.vocab_size
        self.word_embedding = nn.Embedding(v, h)
        self.position_embedding = nn.Parameter(torch.randn(cfg.seq_len, h) * 0.02)
        self.layers = nn.ModuleList(Block(h, cfg.num_heads, cfg.ffn_hidden_size, cfg.norm_eps)
                                    for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(h, eps=cfg.norm_eps)
        nn.init.normal_(self.word_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.word_embedding(tokens) + self.position_embedding[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        logits = self.final_norm(x) @ self.word_embedding.weight.t()
        return F.cross_entropy(logits[..., : self.vocab_size].flatten(0, 1), targets.flatten())


def tensor_parallel_plan(model: PlainGPT) -> dict:
    """DTensor's Megatron split of every block (torch.distributed.tensor.parallel)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(len(model.layers)):
        plan.update({f"layers.{i}.qkv": ColwiseParallel(), f"layers.{i}.proj": RowwiseParallel(),
                     f"layers.{i}.fc1": ColwiseParallel(), f"layers.{i}.fc2": RowwiseParallel()})
    return plan
