"""Model hyper-parameters, as data.

Two families share one decoder:
  style="gpt"   GPT-3 / MT-NLG: learned positions, pre-LayerNorm, GeLU MLP of 4h, biases,
                tied input/output embeddings.
  style="llama" RoPE, RMSNorm, SwiGLU MLP, no biases, untied output layer.

Parameter count (Narayanan et al. 2021): P = 12*l*h^2 * (1 + 13/(12h) + (V+s)/(12*l*h)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    ffn_hidden_size: int | None = None  # default 4h (gpt) or the SwiGLU 8h/3 rounded (llama)
    seq_len: int = 64
    vocab_size: int = 256
    dropout: float = 0.0
    attention_dropout: float | None = None  # default: same as dropout
    style: str = "gpt"
    init_std: float = 0.02
    norm_eps: float = 1e-5
    tie_embeddings: bool | None = None  # default: True for gpt, False for llama
    rope_theta: float = 10000.0
    vocab_pad_multiple: int = 128  # padded vocab = round up to lcm(this, tp)

    def __post_init__(self) -> None:
        if self.style not in ("gpt", "llama"):
            raise ValueError(f"model.style must be one of gpt, llama, got {self.style!r}: "
                             f"set model.style")
        if self.ffn_hidden_size is None:
            if self.style == "gpt":
                self.ffn_hidden_size = 4 * self.hidden_size
            else:
                self.ffn_hidden_size = 64 * math.ceil(int(8 * self.hidden_size / 3) / 64)
        if self.attention_dropout is None:
            self.attention_dropout = self.dropout
        if self.tie_embeddings is None:
            self.tie_embeddings = self.style == "gpt"
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size = {self.hidden_size} is not divisible by "
                             f"model.num_heads = {self.num_heads}: change model.hidden_size or "
                             f"model.num_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def use_bias(self) -> bool:
        return self.style == "gpt"

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = math.lcm(self.vocab_pad_multiple, tp)
        return multiple * math.ceil(self.vocab_size / multiple)

    def num_parameters(self) -> int:
        """Exact count for this config (unpadded vocab, tied output counted once)."""
        h, f, v, s = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.seq_len
        if self.style == "gpt":
            per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # attn, mlp, 2 LayerNorms
            embeddings = v * h + s * h
            final_norm = 2 * h
        else:
            per_layer = 4 * h * h + 3 * h * f + 2 * h
            embeddings = v * h
            final_norm = h
        untied_head = 0 if self.tie_embeddings else v * h
        return self.num_layers * per_layer + embeddings + final_norm + untied_head

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known - {"name"}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}: remove the key, or "
                             f"check its spelling")
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)
