"""Model hyper-parameters, as data.

Two families share one decoder:
  style="gpt"   GPT-3 / MT-NLG: learned positions, pre-LayerNorm, GeLU MLP of 4h, biases,
                tied input/output embeddings.
  style="llama" RoPE, RMSNorm, SwiGLU MLP, no biases, untied output layer.

Parameter count (Narayanan et al. 2021): P = 12*l*h^2 * (1 + 13/(12h) + (V+s)/(12*l*h)).

A mixture of experts (`moe`, nanomt.model.moe) replaces the MLP of every `every`-th layer by
E experts of width ffn_e, k of them active per token (plus `shared_experts` always-active ones):
such a layer holds E * m * h * ffn_e expert weights (m = 2 GeLU, 3 SwiGLU) of which a token
uses k * m * h * ffn_e ("active" parameters), plus the router's E * h.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass
class MoEConfig:
    """model.moe: a mixture of experts in place of the MLP (null: dense). Dropless only."""

    num_experts: int = 4
    top_k: int = 2
    ffn_hidden_size: int = 128    # per expert
    every: int = 1                # global layer i is MoE iff i % every == every - 1
    shared_experts: int = 0       # always-active experts: one dense MLP of their total width
    aux_loss_coef: float = 0.01   # Switch/GShard load balancing
    z_loss_coef: float = 0.0      # router z-loss (ST-MoE)

    def __post_init__(self) -> None:
        checks = [("num_experts", self.num_experts >= 1, "at least 1"),
                  ("top_k", 1 <= self.top_k <= self.num_experts,
                   f"between 1 and model.moe.num_experts = {self.num_experts}"),
                  ("ffn_hidden_size", self.ffn_hidden_size >= 1, "at least 1"),
                  ("every", self.every >= 1, "at least 1"),
                  ("shared_experts", self.shared_experts >= 0, "at least 0"),
                  ("aux_loss_coef", self.aux_loss_coef >= 0, "at least 0"),
                  ("z_loss_coef", self.z_loss_coef >= 0, "at least 0")]
        for key, ok, want in checks:
            if not ok:
                raise ValueError(f"model.moe.{key} = {getattr(self, key)} must be {want}: "
                                 f"set model.moe.{key}")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer `layer` (0-based) has experts instead of a dense MLP."""
        return layer % self.every == self.every - 1

    def num_moe_layers(self, num_layers: int) -> int:
        return sum(self.is_moe_layer(i) for i in range(num_layers))


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
    moe: MoEConfig | None = None   # a mixture of experts (nanomt.model.moe), or dense

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict) or hasattr(self.moe, "keys"):  # a mapping from the config
            unknown = set(self.moe) - {f.name for f in fields(MoEConfig)}
            if unknown:
                raise ValueError(f"unknown model.moe keys: {sorted(unknown)}: remove the key, "
                                 f"or check its spelling")
            self.moe = MoEConfig(**dict(self.moe))
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

    def mlp_parameters(self, ffn: int) -> int:
        """A dense MLP h -> ffn -> h: GeLU with biases (gpt) or SwiGLU without (llama)."""
        h = self.hidden_size
        return 2 * h * ffn + ffn + h if self.style == "gpt" else 3 * h * ffn

    def moe_mlp_parameters(self, active: bool = False) -> int:
        """One MoE layer's MLP: router, the experts (only k of them if `active`), shared ones."""
        moe, h = self.moe, self.hidden_size
        per_expert = (2 if self.style == "gpt" else 3) * h * moe.ffn_hidden_size  # no biases
        experts = moe.top_k if active else moe.num_experts
        shared = self.mlp_parameters(moe.shared_experts * moe.ffn_hidden_size) \
            if moe.shared_experts else 0
        return moe.num_experts * h + experts * per_expert + shared

    def num_parameters(self, active: bool = False) -> int:
        """Exact count for this config (unpadded vocab, tied output counted once); `active`:
        only the k experts a token uses in each MoE layer (the same as the total when dense)."""
        h, f, v, s = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.seq_len
        if self.style == "gpt":
            attention_and_norms = 4 * h * h + 4 * h + 4 * h  # attention, 2 LayerNorms
            embeddings = v * h + s * h
            final_norm = 2 * h
        else:
            attention_and_norms = 4 * h * h + 2 * h
            embeddings = v * h
            final_norm = h
        moe_layers = self.moe.num_moe_layers(self.num_layers) if self.moe else 0
        layers = (self.num_layers * attention_and_norms
                  + (self.num_layers - moe_layers) * self.mlp_parameters(f))
        if moe_layers:
            layers += moe_layers * self.moe_mlp_parameters(active)
        untied_head = 0 if self.tie_embeddings else v * h
        return layers + embeddings + final_norm + untied_head

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
