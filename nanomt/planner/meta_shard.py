"""Build one rank's shard of the real model on the meta device and count its parameters.

The planner's counts (nanomt.planner.params) are formulas; this is the model itself, built by
the code training uses (nanomt.model.chunks) for pipeline rank `pp_rank` and tensor-parallel
rank `tp_rank`, with tensors that have a shape and no storage, so a 530B model's shard costs
no memory. A tensor-parallel layer asks its process group for its rank and size: a "fake"
process group (torch's, for one process standing in for rank `tp_rank` of `tp` without any
peer) answers, and no collective runs while the model is built. Under expert parallelism the
fake world is tp x ep ranks (tp innermost) and the rank's tp and ep groups are cut from it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from nanomt.model.chunks import build_model_chunks
from nanomt.model.config import ModelConfig


def meta_shard_params(cfg: ModelConfig, tp: int, pp: int, virtual_stages: int, pp_rank: int,
                      tp_rank: int = 0, sequence_parallel: bool = False, ep: int = 1,
                      ep_rank: int = 0, schedule: str = "1f1b") -> int:
    """Parameters of the model chunks of rank (tp_rank, pp_rank, ep_rank), built on `meta`."""
    if dist.is_initialized():
        raise RuntimeError("meta_shard_params builds its own fake process group: call it outside "
                           "a distributed run")
    # no store: torch makes one; a fake group needs no peer to join new_group
    dist.init_process_group("fake", rank=ep_rank * tp + tp_rank, world_size=tp * ep)
    try:
        tp_group = ep_group = dist.group.WORLD
        if ep > 1:
            tp_group = dist.new_group([ep_rank * tp + j for j in range(tp)])
            ep_group = dist.new_group([r * tp + tp_rank for r in range(ep)])
        # what model building reads of a grid (context parallelism: none; it shares weights)
        grid = SimpleNamespace(tp_group=tp_group if tp > 1 else None, cp_group=None,
                               ep_group=ep_group if ep > 1 else None, pp_rank=pp_rank,
                               pp_size=pp)
        with torch.device("meta"):
            chunks = build_model_chunks(cfg, grid, virtual_stages, schedule=schedule,
                                        sequence_parallel=sequence_parallel, device="meta")
        return sum(p.numel() for chunk in chunks for p in chunk.parameters())
    finally:
        dist.destroy_process_group()
