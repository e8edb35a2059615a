"""One transformer layer, built from tensor-parallel pieces.

    x = x + Dropout(Attention(Norm(x)))     Attention = ColumnParallel(QKV) -> SDPA -> RowParallel
    x = x + Dropout(MLP(Norm(x)))           MLP       = ColumnParallel -> GeLU/SwiGLU -> RowParallel
                                                        or a mixture of experts (nanomt.model.moe)

With tp=1 every parallel linear is an ordinary linear and this is a plain pre-norm GPT block.
With tp=t each rank holds num_heads/t heads and ffn/t MLP columns, and the layer issues one f and
one g per block. With sequence parallelism the norms and dropouts run on [s/t, b, h].
Activations are [seq, batch, hidden] (nanomt.parallel.mappings); attention permutes to SDPA's
[batch, heads, seq, head_dim] and back.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from nanomt.model.checkpointing import checkpoint
from nanomt.model.config import ModelConfig
from nanomt.model.kv_cache import LayerKVCache
from nanomt.model.moe import MoEMLP
from nanomt.model.rope import apply_rope, rope_cache
from nanomt.model.split_heads import SplitHeads
from nanomt.parallel import comm
from nanomt.parallel.blockwise_init import NormalInit
from nanomt.parallel.comm import Group
from nanomt.parallel.context_parallel import local_positions, ring_attention
from nanomt.parallel.random import TensorParallelRNG
from nanomt.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm (gpt) or RMSNorm (llama); replicated over tp (under SP: partial gradients).
    Gains start at one, biases at zero (also when built on the meta device and drawn later)."""
    h = cfg.hidden_size
    norm = (nn.LayerNorm(h, eps=cfg.norm_eps) if cfg.style == "gpt"
            else nn.RMSNorm(h, eps=cfg.norm_eps))
    norm.initializers = {"weight": partial(torch.ones, h), "bias": partial(torch.zeros, h)}
    return norm


class ParallelAttention(nn.Module):
    """Causal self-attention with heads split across the tp group (and under context
    parallelism, the sequence across the cp group: ring attention)."""

    def __init__(self, cfg: ModelConfig, tp_group: Group, init: NormalInit,
                 out_init: NormalInit, sequence_parallel: bool, rng: TensorParallelRNG,
                 cp_group: Group = None):
        super().__init__()
        self.cp_group = cp_group
        self.cp_rank, self.cp_size = comm.rank_and_size(cp_group)
        self.heads_per_rank = cfg.num_heads // comm.group_size(tp_group)
        self.head_dim = cfg.head_dim
        self.use_rope = cfg.style == "llama"
        self.dropout_p, self.rng = cfg.attention_dropout, rng
        self.recompute = "none"  # "selective": recompute core_attention in backward
        self.qkv = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, tp_group,
                                        init.child("qkv"), bias=cfg.use_bias,
                                        sequence_parallel=sequence_parallel)
        self.proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, tp_group,
                                      out_init.child("proj"), bias=cfg.use_bias,
                                      sequence_parallel=sequence_parallel)
        if self.use_rope:
            cos, sin = rope_cache(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + causal mask) v on this rank's heads."""
        if not self.training or self.dropout_p == 0.0:  # no draws: skip the RNG state swaps
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with self.rng.fork():  # different heads on each tp rank: different dropout masks
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p,
                                                  is_causal=True)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        qkv = self.qkv(x)  # [s, b, 3h/t] (full sequence even under SP)
        s, b, _ = qkv.shape
        # each [b, heads/t, s, d]: what SDPA reads (nanomt.model.split_heads)
        q, k, v = SplitHeads.apply(qkv, self.heads_per_rank, self.head_dim)
        start = cache.length if cache is not None else 0
        if self.use_rope:
            cos, sin = self.rope_cos, self.rope_sin
            if self.cp_size > 1:  # this rank's tokens sit at two places of the full sequence
                positions = local_positions(s * self.cp_size, self.cp_rank, self.cp_size, x.device)
                cos, sin = cos[positions], sin[positions]
            q, k = apply_rope(q, cos, sin, start), apply_rope(k, cos, sin, start)
        if self.cp_size > 1:  # saves only q, k, v, out and lse: already selective
            out = ring_attention(q, k, v, self.cp_group)
        elif cache is not None:
            out = cache.attend(q, k, v)
        elif self.recompute == "selective" and torch.is_grad_enabled():
            out = checkpoint(self.core_attention, q, k, v, rng=self.rng)  # keep only q, k, v
        else:
            out = self.core_attention(q, k, v)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads_per_rank * self.head_dim)
        return self.proj(out)


class ParallelMLP(nn.Module):
    """GeLU MLP fc2(gelu(fc1 x)) (gpt) or SwiGLU fc2(silu(gate x) * up x) (llama), h -> ffn -> h.

    SwiGLU's gate and up are one column-parallel weight fc1 [2, ffn, h] = [gate; up], split
    along its ffn rows: each rank holds its gate rows and the matching up rows, and reads its
    input through one f (as QKV is one weight)."""

    def __init__(self, cfg: ModelConfig, tp_group: Group, init: NormalInit,
                 out_init: NormalInit, sequence_parallel: bool, ffn_hidden_size: int | None = None):
        super().__init__()
        h, bias = cfg.hidden_size, cfg.use_bias
        f = ffn_hidden_size or cfg.ffn_hidden_size
        self.swiglu = cfg.style == "llama"
        self.fc1 = ColumnParallelLinear(h, f, tp_group, init.child("fc1"), bias=bias,
                                        sequence_parallel=sequence_parallel,
                                        stacked=2 if self.swiglu else 1)
        self.fc2 = RowParallelLinear(f, h, tp_group, out_init.child("fc2"), bias=bias,
                                     sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)  # [s, b, ffn/t], or [s, b, 2 ffn/t] = [gate | up] for SwiGLU
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(y, approximate="tanh"))


def make_mlp(cfg: ModelConfig, layer: int, tp_group: Group, init: NormalInit,
             out_init: NormalInit, sequence_parallel: bool, ep_group: Group = None,
             cp_group: Group = None) -> nn.Module:
    """Global layer `layer`'s MLP: dense, or a mixture of experts (model.moe.every picks which
    layers; nanomt.model.moe), whose shared experts are one dense MLP of their total width."""
    if cfg.moe is None or not cfg.moe.is_moe_layer(layer):
        return ParallelMLP(cfg, tp_group, init, out_init, sequence_parallel)
    shared = None
    if cfg.moe.shared_experts:
        shared = ParallelMLP(cfg, tp_group, init.child("shared"), out_init.child("shared"),
                             sequence_parallel, cfg.moe.shared_experts * cfg.moe.ffn_hidden_size)
    return MoEMLP(cfg, tp_group, init, out_init, sequence_parallel, ep_group, cp_group, shared,
                  layer)


class TransformerLayer(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)). `init` / `out_init`:
    N(0, std) for its weights and N(0, std/sqrt(2L)) for its two output projections. `layer`:
    its global index (which MLP it has); `ep_group`: the experts' ranks (nanomt.parallel.grid)."""

    def __init__(self, cfg: ModelConfig, tp_group: Group, init: NormalInit,
                 out_init: NormalInit, sequence_parallel: bool, rng: TensorParallelRNG,
                 cp_group: Group = None, layer: int = 0, ep_group: Group = None):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.dropout_p, self.rng = cfg.dropout, rng
        self.recompute = "none"  # "full": keep only the input, recompute the layer in backward
        self.norm1 = make_norm(cfg)
        self.attention = ParallelAttention(cfg, tp_group, init.child("attention"),
                                           out_init.child("attention"), sequence_parallel, rng,
                                           cp_group)
        self.norm2 = make_norm(cfg)
        self.mlp = make_mlp(cfg, layer, tp_group, init.child("mlp"), out_init.child("mlp"),
                            sequence_parallel, ep_group, cp_group)

    def residual_dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout_p == 0.0:
            return x
        if self.sequence_parallel:  # each tp rank holds a different sequence shard
            with self.rng.fork():
                return F.dropout(x, self.dropout_p, training=True)
        return F.dropout(x, self.dropout_p, training=True)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self.layer, x, rng=self.rng)  # keep only the input x
        return self.layer(x, cache)

    def layer(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.residual_dropout(self.attention(self.norm1(x), cache))
        return x + self.residual_dropout(self.mlp(self.norm2(x)))
