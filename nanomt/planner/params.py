"""Parameters per rank: what tensor, pipeline and expert parallelism leave on each GPU.

With t = tp, one transformer layer of hidden h and feed-forward f holds on each rank

    attention   4 h^2 / t weights (Q, K, V and the projection, split by heads)
                + 3h/t + h biases (Q, K, V split; the row-parallel projection's bias whole)
    MLP         (k + 1) f h / t weights (k = 1 for GeLU, 2 for SwiGLU's gate and up rows)
                + f/t + h biases (GeLU only)
    norms       2 x 2h (LayerNorm weight and bias) or 2 x h (RMSNorm), whole on every rank

A mixture-of-experts layer (model.moe: nanomt.model.config.MoEConfig says which layers) has
instead of the MLP, with E experts of width f_e, S shared experts and ep = parallel.ep,

    router          E h weights, whole on every rank (tp and ep)
    routed experts  E/ep x (k + 1) f_e h / t weights, no biases: ep rank r holds experts
                    [r E/ep, (r+1) E/ep), each split over tp like the dense MLP
    shared experts  a dense MLP of width S f_e (its biases too, GeLU only)

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


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Global layer `layer` has experts (model.moe.every), not a dense MLP."""
    return cfg.moe is not None and cfg.moe.is_moe_layer(layer)


def mlp_params(cfg: ModelConfig, width: int, tp: int) -> int:
    """A dense MLP of `width` on one tensor-parallel rank, biases included (GeLU only)."""
    h, gated = cfg.hidden_size, 2 if cfg.style == "llama" else 1
    return (gated + 1) * width * h // tp + ((width // tp + h) if cfg.use_bias else 0)


def one_expert_params(cfg: ModelConfig, tp: int) -> int:
    """One routed expert's weights on one tensor-parallel rank: (k + 1) f_e h / t."""
    gated = 2 if cfg.style == "llama" else 1
    return (gated + 1) * cfg.moe.ffn_hidden_size * cfg.hidden_size // tp


def expert_layer_params(cfg: ModelConfig, tp: int, ep: int) -> int:
    """The stacked routed experts of one MoE layer on one (tp, ep) rank: E/ep of them."""
    return cfg.moe.num_experts // ep * one_expert_params(cfg, tp)


def layer_params(cfg: ModelConfig, tp: int, layer: int = 0, ep: int = 1) -> int:
    """Global layer `layer`'s parameters on one tensor-parallel (and expert-parallel) rank."""
    h = cfg.hidden_size
    attention = 4 * h * h // tp + ((3 * h // tp + h) if cfg.use_bias else 0)
    norms = 2 * (2 * h if cfg.style == "gpt" else h)
    if not is_moe_layer(cfg, layer):
        return attention + mlp_params(cfg, cfg.ffn_hidden_size, tp) + norms
    moe = cfg.moe
    shared = mlp_params(cfg, moe.shared_experts * moe.ffn_hidden_size, tp) \
        if moe.shared_experts else 0
    router = moe.num_experts * h
    return attention + router + expert_layer_params(cfg, tp, ep) + shared + norms


def chunk_layers(cfg: ModelConfig, chunk: int, num_chunks: int) -> range:
    """The global layers of chunk `chunk` of `num_chunks`."""
    per_chunk = cfg.num_layers // num_chunks
    return range(chunk * per_chunk, (chunk + 1) * per_chunk)


def chunk_params(cfg: ModelConfig, tp: int, chunk: int, num_chunks: int, ep: int = 1) -> int:
    """Global chunk `chunk` of `num_chunks`: its layers, plus the embedding or head it holds."""
    h = cfg.hidden_size
    vocab_shard = cfg.padded_vocab_size(tp) // tp * h
    total = sum(layer_params(cfg, tp, i, ep) for i in chunk_layers(cfg, chunk, num_chunks))
    first, last = chunk == 0, chunk == num_chunks - 1
    if first:
        total += vocab_shard + (cfg.seq_len * h if cfg.style == "gpt" else 0)
    if last:
        total += 2 * h if cfg.style == "gpt" else h  # final norm
        if not first or not cfg.tie_embeddings:
            total += vocab_shard  # the tied copy, or the untied output layer
    return total


def chunk_expert_params(cfg: ModelConfig, tp: int, chunk: int, num_chunks: int, ep: int) -> int:
    """Of chunk_params, the stacked experts' (ParamInfo.expert: their gradients are reduced,
    and ZeRO shards them, over the dp*cp/ep ranks of the same ep rank, not over dp*cp)."""
    layers = chunk_layers(cfg, chunk, num_chunks)
    return sum(expert_layer_params(cfg, tp, ep) for i in layers if is_moe_layer(cfg, i))


def params_on_pipeline_rank(cfg: ModelConfig, tp: int, pp: int, virtual_stages: int,
                            pp_rank: int, ep: int = 1, experts_only: bool = False,
                            v_shape: bool = False) -> int:
    """Parameters of each (tp, ep) rank of pipeline rank `pp_rank` (all hold as many);
    `experts_only`: only its stacked experts'; `v_shape`: ZB-V's placement."""
    chunks = pp * virtual_stages
    mine = [global_chunk_index(j, pp_rank, pp, v_shape) for j in range(virtual_stages)]
    count = chunk_expert_params if experts_only else chunk_params
    return sum(count(cfg, tp, c, chunks, ep) for c in mine)


def largest_pipeline_rank(cfg: ModelConfig, tp: int, pp: int, virtual_stages: int,
                          ep: int = 1) -> int:
    """The pipeline rank holding the most parameters (the first, on ties)."""
    counts = [params_on_pipeline_rank(cfg, tp, pp, virtual_stages, r, ep) for r in range(pp)]
    return counts.index(max(counts))
