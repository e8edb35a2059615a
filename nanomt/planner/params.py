"""Parameters per rank: what tensor and pipeline parallelism leave on each GPU.

With t = tp, one transformer layer of hidden h and feed-forward f holds on each rank

    attention   4 h^2 / t weights (Q, K, V and the projection, split by heads)
                + 3h/t + h biases (Q, K, V split; the row-parallel projection's bias whole)
    MLP         (k + 1) f h / t weights (k = 1 for GeLU, 2 for SwiGLU's gate and up rows)
                + f/t + h biases (GeLU only)
    norms       2 x 2h (LayerNorm weight and bias) or 2 x h (RMSNorm), whole on every rank

The word embedding is split by vocabulary rows, V_padded / t x h (V padded to a multiple of
lcm(128, t)); the first chunk adds learned positions s h (GPT, whole), the last chunk the final
norm and, untied (llama), its own output layer V_padded / t x h, or tied (GPT) a copy of the word
embedding. Pipeline rank r holds chunks r, r + p, ... of the p v chunks of l / (p v) layers,
or under ZB-V (parallel.schedule=zbv, a V) chunks r and 2p-1-r: rank 0 holds the embedding and
the head.
"""

from __future__ import annotations

from nanomt.model.config import ModelConfig
from nanomt.parallel.pipeline.partition import global_chunk_index


def layer_params(cfg: ModelConfig, tp: int) -> int:
    """One transformer layer's parameters on one tensor-parallel rank."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    gated = 2 if cfg.style == "llama" else 1
    weights = 4 * h * h // tp + (gated + 1) * f * h // tp
    biases = (3 * h // tp + h + f // tp + h) if cfg.use_bias else 0
    norms = 2 * (2 * h if cfg.style == "gpt" else h)
    return weights + biases + norms


def chunk_params(cfg: ModelConfig, tp: int, chunk: int, num_chunks: int) -> int:
    """Global chunk `chunk` of `num_chunks`: its layers, plus the embedding or head it holds."""
    h = cfg.hidden_size
    vocab_shard = cfg.padded_vocab_size(tp) // tp * h
    total = cfg.num_layers // num_chunks * layer_params(cfg, tp)
    first, last = chunk == 0, chunk == num_chunks - 1
    if first:
        total += vocab_shard + (cfg.seq_len * h if cfg.style == "gpt" else 0)
    if last:
        total += 2 * h if cfg.style == "gpt" else h  # final norm
        if not first or not cfg.tie_embeddings:
            total += vocab_shard  # the tied copy, or the untied output layer
    return total


def params_on_pipeline_rank(cfg: ModelConfig, tp: int, pp: int, virtual_stages: int,
                            pp_rank: int, v_shape: bool = False) -> int:
    """Parameters of each tp rank of pipeline rank `pp_rank` (all tp ranks hold as many);
    `v_shape`: ZB-V's placement."""
    chunks = pp * virtual_stages
    return sum(chunk_params(cfg, tp, global_chunk_index(j, pp_rank, pp, v_shape), chunks)
               for j in range(virtual_stages))


def largest_pipeline_rank(cfg: ModelConfig, tp: int, pp: int, virtual_stages: int) -> int:
    """The pipeline rank holding the most parameters (the first, on ties)."""
    counts = [params_on_pipeline_rank(cfg, tp, pp, virtual_stages, r) for r in range(pp)]
    return counts.index(max(counts))
