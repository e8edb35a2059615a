"""The 3D process grid: which rank does which slice of the work.

MT-NLG maps one model replica onto tp x pp GPUs and replicates it dp times (Smith et al. 2022,
section 3.2). The mapping is topology-aware: tensor parallelism, which talks most, is innermost
(consecutive ranks, so a tp group of 8 fills one DGX node over NVLink), data parallelism next,
and pipeline parallelism, which talks least, outermost:

    global_rank = (pp_rank * dp + dp_rank) * tp + tp_rank

`ParallelGrid` owns this layout and every process group built on it. It is passed explicitly to
whatever needs a group (as nanotron's ParallelContext), never stored in a module global, so a
test can build a single-process grid beside a distributed one.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanomt.parallel import comm


@dataclass(frozen=True)
class Coord:
    """A rank's coordinates in the grid."""

    tp: int
    pp: int
    dp: int


def validate_layout(world_size: int, tp: int, pp: int, dp: int) -> None:
    """Raise a clear error, before any collective, when the layout cannot cover the world."""
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
    if tp * pp * dp != world_size:
        raise ValueError(
            f"world size {world_size} != tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp}; "
            f"launch tp*pp*dp processes or change parallel.tp/pp/dp"
        )


def infer_dp(world_size: int, tp: int, pp: int) -> int:
    """dp left empty in the config: whatever the world has left after tp*pp."""
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}; cannot infer dp"
        )
    return world_size // (tp * pp)


class ParallelGrid:
    """The (tp, pp, dp) layout of the world and its process groups.

    Groups (each a list of global ranks that talk to each other):
      tp_group        ranks that split one layer's matrices        (consecutive ranks)
      dp_group        ranks that hold the same shard of the model  (same tp, pp)
      pp_group        ranks that hold the successive pipeline stages (same tp, dp)
      embedding_group first and last pipeline stage: share the tied word embedding's gradient
      model_parallel_group  the tp*pp ranks of one model replica (global norms, loss-scale votes)

    With world size 1 no process group is needed: every group is None and every collective in
    nanomt.parallel is the identity, so the single-process model reads like plain PyTorch.
    """

    def __init__(self, tp: int = 1, pp: int = 1, dp: int = 1, timeout_s: float = 300.0):
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        validate_layout(world_size, tp, pp, dp)
        self.tp_size, self.pp_size, self.dp_size = tp, pp, dp
        self.world_size = world_size
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # ranks[pp, dp, tp] = global rank: the whole mapping in one tensor.
        self.ranks = torch.arange(world_size).view(pp, dp, tp)
        self.coord = self.coord_of(self.rank)
        self.tp_rank, self.pp_rank, self.dp_rank = self.coord.tp, self.coord.pp, self.coord.dp

        self.tp_group = self.pp_group = self.dp_group = None
        self.embedding_group = self.model_parallel_group = None
        self.tp_ranks = self.ranks[self.pp_rank, self.dp_rank, :].tolist()
        self.dp_ranks = self.ranks[self.pp_rank, :, self.tp_rank].tolist()
        self.pp_ranks = self.ranks[:, self.dp_rank, self.tp_rank].tolist()
        self.embedding_ranks = sorted({self.pp_ranks[0], self.pp_ranks[-1]})
        self.model_parallel_ranks = self.ranks[:, self.dp_rank, :].flatten().tolist()
        if world_size > 1:
            self._build_groups()
            for name in ("tp", "pp", "dp", "embedding", "model_parallel"):
                comm.name_group(getattr(self, f"{name}_group"), name)

    def _new_group(self, ranks: list[int]):
        return dist.new_group(ranks, timeout=self.timeout)

    def _build_groups(self) -> None:
        # dist.new_group is collective over the whole world: every rank must create every group,
        # in the same order, and keep the one it belongs to.
        pp, dp, tp = self.ranks.shape
        for p in range(pp):
            for d in range(dp):
                g = self._new_group(self.ranks[p, d, :].tolist())
                if self.rank in self.ranks[p, d, :].tolist():
                    self.tp_group = g
        for p in range(pp):
            for t in range(tp):
                g = self._new_group(self.ranks[p, :, t].tolist())
                if self.rank in self.ranks[p, :, t].tolist():
                    self.dp_group = g
        for d in range(dp):
            for t in range(tp):
                members = self.ranks[:, d, t].tolist()
                g = self._new_group(members)
                if self.rank in members:
                    self.pp_group = g
                emb = sorted({members[0], members[-1]})
                g = self._new_group(emb)
                if self.rank in emb:
                    self.embedding_group = g
        for d in range(dp):
            members = self.ranks[:, d, :].flatten().tolist()
            g = self._new_group(members)
            if self.rank in members:
                self.model_parallel_group = g

    # ---- questions people ask the grid -------------------------------------------------------
    def global_rank(self, tp: int, pp: int, dp: int) -> int:
        """The global rank at grid coordinates (tp, pp, dp)."""
        return int(self.ranks[pp, dp, tp])

    def coord_of(self, rank: int) -> Coord:
        p, d, t = (self.ranks == rank).nonzero()[0].tolist()
        return Coord(tp=t, pp=p, dp=d)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size} "
            f"pp {self.pp_rank}/{self.pp_size} dp {self.dp_rank}/{self.dp_size}"
        )
