"""Splitting the model into pipeline chunks, and the tied embedding they share.

The l layers are cut into p*v equal chunks of l/(p*v) consecutive layers (Narayanan et al. 2021,
section 2.2.2). Chunk k goes to pipeline rank k mod p, so with v > 1 each rank holds v chunks
spread over the depth of the model (rank 0 holds chunks 0, p, 2p, ...); ZB-V places its two
chunks per rank in a V instead (rank r: chunks r and 2p-1-r). The first chunk also
holds the embedding, the last the final norm, the output head and the loss. (The model builds
its chunks from these ranges: nanomt.model.chunks.)

With tied input/output embeddings (GPT) the last stage keeps its own copy of the word
embedding. Both copies start equal, and after every backward the first and last stage sum their
gradients over the grid's embedding group, so both equal the single-process gradient and both
copies stay equal after every optimizer step (Megatron's embedding group).
"""

from __future__ import annotations

from torch import nn

from nanomt.parallel import comm
from nanomt.parallel.param_info import param_info


def chunk_layer_ranges(num_layers: int, pp: int, virtual_stages: int) -> list[range]:
    """Layers of each of the p*v global chunks, in model order (p*v divides the layers: the
    config checks it, nanomt.config.check_pipeline)."""
    chunks = pp * virtual_stages
    per_chunk = num_layers // chunks
    return [range(k * per_chunk, (k + 1) * per_chunk) for k in range(chunks)]


def global_chunk_index(local_chunk: int, pp_rank: int, pp: int, v_shape: bool = False) -> int:
    """Local chunk j of pipeline rank r is chunk j*p + r of the model; in ZB-V's V (`v_shape`,
    two chunks per rank) rank r holds chunks r and 2p-1-r, so rank 0 holds the first and last."""
    return 2 * pp - 1 - pp_rank if v_shape and local_chunk == 1 else local_chunk * pp + pp_rank


def rank_of_chunk(global_chunk: int, pp: int, v_shape: bool = False) -> int:
    """The pipeline rank that holds global chunk k (the inverse of global_chunk_index)."""
    return 2 * pp - 1 - global_chunk if v_shape and global_chunk >= pp else global_chunk % pp


def shared_embedding_params(model_chunks: list[nn.Module]) -> list[nn.Parameter]:
    """The tied word embedding of each chunk that holds one (first and last stage, GPT)."""
    return [p for chunk in model_chunks for p in chunk.parameters()
            if param_info(p).tied_group is not None]


def allreduce_embedding_grads(model_chunks: list[nn.Module], grid) -> None:
    """Sum the tied word embedding's gradient over the first and last pipeline stage.

    Both stages hold the same config, so either both see a .grad here or neither does."""
    if grid is None or grid.pp_size == 1 or grid.embedding_group is None:
        return
    params = shared_embedding_params(model_chunks)  # read from the ParamInfo records
    if not params:
        return  # untied input and output embeddings (llama): nothing is shared
    if len(params) != 1:
        raise ValueError(f"pipeline rank {grid.pp_rank} holds {len(params)} tied embeddings, "
                         f"expected 1 on the first and last stage")
    weight = params[0]
    if weight.grad is None:
        # A gradient buffer's hook (nanomt.parallel.data_parallel) has moved the gradient into
        # its bucket; finalize_grads sums the two copies there, after the dp reduction.
        return
    comm.all_reduce(weight.grad, grid.embedding_group)
