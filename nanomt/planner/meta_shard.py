"""Build one rank's shard of the real model on the meta device and count its parameters.

The planner's counts (nanomt.planner.params) are formulas; this is the model itself, built by
the code training uses (nanomt.model.chunks) for pipeline rank `pp_rank` and tensor-parallel
rank `tp_rank`, with tensors that have a shape and no storage, so a 530B model's shard costs
no memory. A tensor-parallel layer asks its process group for its rank and size: a "fake"
process group (torch's, for one process standing in for rank `tp_rank` of `tp` without any
peer) answers, and no collective runs while the model is built.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from nanomt.model.chunks import build_model_chunks
from nanomt.model.config import ModelConfig


def meta_shard_params(cfg: ModelConfig, tp: int, pp: int, virtual_stages: int, pp_rank: int,
                      tp_rank: int = 0, sequence_parallel: bool = False,
                      schedule: str = "1f1b") -> int:
    """Parameters of the model chunks of rank (tp_rank, pp_rank), built on `meta`."""
    if dist.is_initialized():
        raise RuntimeError("meta_shard_params builds its own fake process group: call it outside "
                           "a distributed run")
    dist.init_process_group("fake", rank=tp_rank, world_size=tp)  # no store: torch makes one
    try:
        # what model building reads of a grid (context parallelism: none; it shares weights)
        grid = SimpleNamespace(tp_group=dist.group.WORLD if tp > 1 else None, cp_group=None,
                               pp_rank=pp_rank, pp_size=pp)
        with torch.device("meta"):
            chunks = build_model_chunks(cfg, grid, virtual_stages, schedule=schedule,
                                        sequence_parallel=sequence_parallel, device="meta")
        return sum(p.numel() for chunk in chunks for p in chunk.parameters())
    finally:
        dist.destroy_process_group()
