"""This rank's model chunks: the GPT over each of its pipeline chunks' layer ranges.

Pipeline parallelism decides which layers go where (nanomt.parallel.pipeline.partition: chunk k
of p*v holds layers [k*l/(p*v), (k+1)*l/(p*v)) and lives on pipeline rank k mod p, or under
parallel.schedule=zbv on the rank its V places it: partition.global_chunk_index); the model
builds them: chunk 0 also holds the embedding, the last chunk the final norm, head and loss.
"""

from __future__ import annotations

import contextlib

import torch

from nanomt.model.config import ModelConfig
from nanomt.model.gpt import GPT
from nanomt.parallel.pipeline.partition import chunk_layer_ranges, global_chunk_index
from nanomt.parallel.pipeline.zero_bubble import V_SHAPED


def build_model_chunks(cfg: ModelConfig, grid, virtual_stages: int = 1, *, seed: int = 1234,
                       sequence_parallel: bool = False,
                       device: torch.device | str = "cpu", schedule: str = "1f1b") -> list[GPT]:
    """This rank's v model chunks, local chunk 0 first (each a GPT over its layer range).

    device="meta": parameters are shapes only, drawn later where they are laid out
    (nanomt.parallel.deferred_init; nanomt.optim.build_optimizer materialises them)."""
    pp = grid.pp_size if grid is not None else 1
    pp_rank = grid.pp_rank if grid is not None else 0
    ranges = chunk_layer_ranges(cfg.num_layers, pp, virtual_stages)
    last = len(ranges) - 1
    chunks = []
    for local in range(virtual_stages):
        k = global_chunk_index(local, pp_rank, pp, v_shape=schedule in V_SHAPED)
        with torch.device("meta") if str(device) == "meta" else contextlib.nullcontext():
            chunk = GPT(cfg, grid, seed=seed, sequence_parallel=sequence_parallel,
                        layer_range=ranges[k], pre_process=k == 0, post_process=k == last)
        chunks.append(chunk if str(device) == "meta" else chunk.to(device))
    return chunks
