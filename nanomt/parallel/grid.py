"""The 4D process grid: which rank does which slice of the work.

MT-NLG maps one model replica onto tp x pp GPUs and replicates it dp times (Smith et al. 2022,
section 3.2). The mapping is topology-aware: tensor parallelism, which talks most, is innermost
(consecutive ranks, so a tp group of 8 fills one DGX node over NVLink), then context parallelism
(the sequence split over cp ranks, whose ring of key/value messages talks next most), data
parallelism next, and pipeline parallelism, which talks least, outermost:

    global_rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

A context-parallel group holds one model replica's weights cp times over (each rank sees a
different part of every sequence), so replicated gradients are averaged, and ZeRO shards, over
the dp x cp ranks of a (tp, pp) position: `grad_sync_group`. With cp=1 that is the dp group.

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
    cp: int = 0


def validate_layout(world_size: int, tp: int, pp: int, dp: int | None, cp: int = 1) -> int:
    """Raise a clear error ("what: fix"), before any collective, when the layout cannot cover
    the world. Returns dp; dp=None takes what tp*cp*pp leaves of the world."""
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("cp", cp)):
        if (value is None and name == "dp") or (
                isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            continue
        rule = "a positive integer or null" if name == "dp" else "a positive integer"
        raise ValueError(f"parallel.{name} must be {rule}, got {value!r}: set parallel.{name}")
    if dp is None:
        if world_size % (tp * cp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp*cp*pp = "
                             f"{tp}*{cp}*{pp}, so parallel.dp cannot be inferred: launch a "
                             f"multiple of tp*cp*pp processes or change parallel.tp/cp/pp")
        dp = world_size // (tp * cp * pp)
    if tp * cp * pp * dp != world_size:
        raise ValueError(
            f"world size {world_size} != tp*cp*pp*dp = {tp}*{cp}*{pp}*{dp} = "
            f"{tp * cp * pp * dp}: launch tp*cp*pp*dp processes or change parallel.tp/cp/pp/dp"
        )
    return dp


class ParallelGrid:
    """The (tp, cp, pp, dp) layout of the world and its process groups.

    Groups (each a list of global ranks that talk to each other):
      tp_group        ranks that split one layer's matrices        (consecutive ranks)
      cp_group        ranks that split every sequence of a micro-batch (same tp, pp, dp)
      dp_group        ranks that hold the same shard of the model and different batches
      grad_sync_group the dp x cp ranks of one (tp, pp) position: gradient averaging, ZeRO
      pp_group        ranks that hold the successive pipeline stages (same tp, cp, dp): all
                      pipeline messages, activations and gradients (pipeline/posting.py)
      embedding_group first and last pipeline stage: share the tied word embedding's gradient
      model_parallel_group  the tp*pp ranks of one model replica (global norms, loss-scale votes)

    A group of one rank is None (never created), and every collective in nanomt.parallel is the
    identity on it: with world size 1 every group is None and the single-process model reads
    like plain PyTorch; with pp=1 the pp groups are None, with cp=1 the cp group, and so on.
    """

    def __init__(self, tp: int = 1, pp: int = 1, dp: int = 1, timeout_s: float = 300.0,
                 cp: int = 1):
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        validate_layout(world_size, tp, pp, dp, cp)
        self.tp_size, self.pp_size, self.dp_size, self.cp_size = tp, pp, dp, cp
        self.world_size = world_size
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # ranks[pp, dp, cp, tp] = global rank: the whole mapping in one tensor.
        self.ranks = torch.arange(world_size).view(pp, dp, cp, tp)
        self.coord = self.coord_of(self.rank)
        self.tp_rank, self.pp_rank, self.dp_rank = self.coord.tp, self.coord.pp, self.coord.dp
        self.cp_rank = self.coord.cp

        self.tp_group = self.cp_group = self.pp_group = self.dp_group = None
        self.grad_sync_group = self.embedding_group = self.model_parallel_group = None
        p, d, c, t = self.pp_rank, self.dp_rank, self.cp_rank, self.tp_rank
        self.tp_ranks = self.ranks[p, d, c, :].tolist()
        self.cp_ranks = self.ranks[p, d, :, t].tolist()
        self.dp_ranks = self.ranks[p, :, c, t].tolist()
        self.grad_sync_ranks = self.ranks[p, :, :, t].flatten().tolist()
        self.pp_ranks = self.ranks[:, d, c, t].tolist()
        self.embedding_ranks = sorted({self.pp_ranks[0], self.pp_ranks[-1]})
        self.model_parallel_ranks = self.ranks[:, d, c, :].flatten().tolist()
        if world_size > 1:
            self._build_groups()
            for name in ("tp", "cp", "pp", "grad_sync", "dp", "embedding",
                         "model_parallel"):
                comm.name_group(getattr(self, f"{name}_group"), name)  # dp wins when cp=1

    def _new_group(self, ranks: list[int]):
        return dist.new_group(ranks, timeout=self.timeout)

    def _groups_along(self, free_dims: tuple[int, ...]) -> list[list[int]]:
        """Every group whose members differ only in `free_dims` of ranks[pp, dp, cp, tp]."""
        fixed = [dim for dim in range(4) if dim not in free_dims]
        moved = self.ranks.permute(*fixed, *free_dims)
        size = 1
        for dim in free_dims:
            size *= self.ranks.shape[dim]
        return moved.reshape(-1, size).tolist()

    def _build_groups(self) -> None:
        # dist.new_group is collective over the whole world (with device_id bound on NCCL, a
        # split of the world's communicator): every rank must create every group, in the same
        # order, and keep the one it belongs to. A group of one rank is never created: it stays
        # None, which every collective in nanomt.parallel.comm treats as "no communication".
        # Whether a group has one rank depends on the layout only, so every rank skips the same.
        PP, DP, CP, TP = 0, 1, 2, 3
        for name, free_dims in (("tp", (TP,)), ("cp", (CP,)), ("dp", (DP,)),
                                ("grad_sync", (DP, CP)), ("pp", (PP,)),
                                ("model_parallel", (PP, TP))):
            if name == "grad_sync" and self.cp_size == 1:  # the same ranks as dp: one group
                self.grad_sync_group = self.dp_group
                continue
            for members in self._groups_along(free_dims):
                if len(members) == 1:
                    break  # every group along these dimensions has one rank
                group = self._new_group(members)
                if self.rank in members:
                    setattr(self, f"{name}_group", group)
                if name == "pp":  # the first and last stage
                    embedding = sorted({members[0], members[-1]})
                    group = self._new_group(embedding)
                    if self.rank in embedding:
                        self.embedding_group = group

    # ---- questions people ask the grid -------------------------------------------------------
    def global_rank(self, tp: int, pp: int, dp: int, cp: int = 0) -> int:
        """The global rank at grid coordinates (tp, pp, dp, cp)."""
        return int(self.ranks[pp, dp, cp, tp])

    def coord_of(self, rank: int) -> Coord:
        p, d, c, t = (self.ranks == rank).nonzero()[0].tolist()
        return Coord(tp=t, pp=p, dp=d, cp=c)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1
