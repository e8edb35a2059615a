"""The 4D process grid: which rank does which slice of the work.

MT-NLG maps one model replica onto tp x pp GPUs and replicates it dp times (Smith et al. 2022,
section 3.2). The mapping is topology-aware: the more a dimension talks, the closer its ranks.
Tensor parallelism is innermost (consecutive ranks: a tp group of 8 fills one DGX node over
NVLink), then context parallelism (the sequence split over cp ranks: a ring of key/value
messages), then data parallelism, and pipeline parallelism, which talks least, outermost:

    global_rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

The cp ranks of a replica hold the same weights (each sees a different part of every sequence),
so gradients are averaged, and ZeRO shards, over the dp x cp ranks of a (tp, pp) position:
`grad_sync_group`, the dp group when cp=1.

Expert parallelism (mixture of experts) takes no ranks of its own ("parallel folding"): the
dp x cp ranks of a (tp, pp) position, numbered j = dp_rank * cp + cp_rank, form groups of ep
consecutive ranks that split the experts and exchange tokens by all-to-all (ep_rank = j mod ep);
an expert's weights live on the dp*cp/ep ranks of equal ep_rank, which average its gradient.

`ParallelGrid` owns this layout and its process groups. It is passed to whatever needs a group
(as nanotron's ParallelContext), never kept in a module global, so a test can build a
single-process grid beside a distributed one.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from nanomt.parallel import comm
from nanomt.parallel.layout import validate_layout

PP, DP, CP, TP = 0, 1, 2, 3  # the dims of ParallelGrid.ranks


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
      ep_group        ep consecutive ranks of grad_sync_group: split the experts, all-to-all
      expert_dp_group the ranks of grad_sync_group with my ep_rank: expert gradients, ZeRO

    A group of one rank is None (never created), and every collective in nanomt.parallel is the
    identity on it: with world size 1 every group is None and the single-process model reads
    like plain PyTorch; with pp=1 the pp groups are None, with cp=1 the cp group, and so on.
    """

    def __init__(self, tp: int = 1, pp: int = 1, dp: int = 1, timeout_s: float = 300.0,
                 cp: int = 1, ep: int = 1):
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        validate_layout(world_size, tp, pp, dp, cp, ep)
        self.tp_size, self.pp_size, self.dp_size, self.cp_size = tp, pp, dp, cp
        self.world_size = world_size
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # ranks[pp, dp, cp, tp] = global rank: the whole mapping in one tensor.
        self.ranks = torch.arange(world_size).view(pp, dp, cp, tp)
        p, d, c, t = (self.ranks == self.rank).nonzero()[0].tolist()
        self.tp_rank, self.pp_rank, self.dp_rank, self.cp_rank = t, p, d, c
        self.pp_ranks = self.ranks[:, d, c, t].tolist()  # the pipeline's ranks, stage by stage
        self.ep_size, self.ep_rank = ep, (d * cp + c) % ep

        self.tp_group = self.cp_group = self.pp_group = self.dp_group = None
        self.grad_sync_group = self.embedding_group = self.model_parallel_group = None
        self.ep_group = self.expert_dp_group = None
        if world_size > 1:
            self._build_groups()
            for name in ("tp", "cp", "pp", "ep", "expert_dp", "grad_sync", "dp", "embedding",
                         "model_parallel"):  # a later name wins: dp when cp = ep = 1
                comm.name_group(getattr(self, f"{name}_group"), name)

    def _groups_along(self, free_dims: tuple[int, ...], ranks: torch.Tensor) -> list[list[int]]:
        """Every group whose members differ only in `free_dims` of `ranks`."""
        fixed = [dim for dim in range(ranks.dim()) if dim not in free_dims]
        size = 1
        for dim in free_dims:
            size *= ranks.shape[dim]
        return ranks.permute(*fixed, *free_dims).reshape(-1, size).tolist()

    def _build_groups(self) -> None:
        # dist.new_group is collective over the whole world: every rank creates every group, in
        # the same order, and keeps the ones it belongs to. A group of one rank stays None;
        # that depends on the layout only, so every rank skips the same ones.
        # Expert parallelism folds dp x cp into [dp*cp/ep, ep]: ranks[pp, expert_dp, ep, tp].
        folded = self.ranks.reshape(self.pp_size, -1, self.ep_size, self.tp_size)
        for name, ranks, free_dims in (
                ("tp", self.ranks, (TP,)), ("cp", self.ranks, (CP,)), ("dp", self.ranks, (DP,)),
                ("grad_sync", self.ranks, (DP, CP)), ("pp", self.ranks, (PP,)),
                ("model_parallel", self.ranks, (PP, TP)), ("ep", folded, (2,)),
                ("expert_dp", folded, (1,))):
            if name == "grad_sync" and self.cp_size == 1:  # the same ranks as dp: one group
                self.grad_sync_group = self.dp_group
                continue
            if name == "expert_dp" and self.ep_size == 1:  # the same ranks as grad_sync
                self.expert_dp_group = self.grad_sync_group
                continue
            for members in self._groups_along(free_dims, ranks):
                if len(members) == 1:
                    break  # every group along these dimensions has one rank
                group = dist.new_group(members, timeout=self.timeout)
                if self.rank in members:
                    setattr(self, f"{name}_group", group)
                if name == "pp":  # the first and last stage
                    embedding = sorted({members[0], members[-1]})
                    group = dist.new_group(embedding, timeout=self.timeout)
                    if self.rank in embedding:
                        self.embedding_group = group

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1
