"""The process grid: the rank formula, and groups that really connect the ranks they claim.

    global_rank = (pp_rank * dp + dp_rank) * tp + tp_rank    (tp innermost, pp outermost)

One spawn of four ranks builds every layout of a world of four and, for each group, all-reduces
a one-hot vector of the ranks: what comes back is who actually took part in the collective.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from nanomt.parallel import comm
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.layout import validate_layout
from nanomt.parallel.launch import default_backend
from nanomt.testing import run_distributed
from comm_counting import traffic_log

WORLD = 4
# (tp, pp, dp, cp, ep)
LAYOUTS = [(4, 1, 1, 1, 1), (1, 4, 1, 1, 1), (1, 1, 4, 1, 1), (2, 2, 1, 1, 1), (2, 1, 2, 1, 1),
           (1, 2, 2, 1, 1), (1, 1, 1, 4, 1), (2, 1, 1, 2, 1), (1, 2, 1, 2, 1), (1, 1, 2, 2, 1),
           # expert parallelism folded into the dp x cp ranks
           (1, 1, 4, 1, 2), (1, 1, 4, 1, 4), (1, 1, 2, 2, 2), (1, 1, 2, 2, 4), (2, 1, 2, 1, 2),
           (1, 2, 2, 1, 2)]
GROUPS = ("tp_group", "cp_group", "dp_group", "grad_sync_group", "pp_group",
          "embedding_group", "model_parallel_group", "ep_group", "expert_dp_group")


def expected_rank(t: int, p: int, d: int, c: int, tp: int, dp: int, cp: int) -> int:
    return ((p * dp + d) * cp + c) * tp + t


def expected_groups(rank: int, tp: int, pp: int, dp: int, cp: int, ep: int = 1
                    ) -> dict[str, list[int]]:
    def at(t, p, d, c):
        return expected_rank(t, p, d, c, tp, dp, cp)
    coords = {at(t, p, d, c): (t, p, d, c) for t in range(tp) for p in range(pp)
              for d in range(dp) for c in range(cp)}
    t0, p0, d0, c0 = coords[rank]
    pp_ranks = [at(t0, p, d0, c0) for p in range(pp)]
    embedding = sorted({pp_ranks[0], pp_ranks[-1]})
    # expert parallelism: the dp x cp ranks numbered j = d * cp + c, cut into ep consecutive ones
    folded = [at(t0, p0, j // cp, j % cp) for j in range(dp * cp)]
    j0 = d0 * cp + c0
    return {
        "ep_group": folded[j0 - j0 % ep: j0 - j0 % ep + ep],
        "expert_dp_group": sorted(folded[j0 % ep::ep]),
        "tp_group": [at(t, p0, d0, c0) for t in range(tp)],
        "cp_group": [at(t0, p0, d0, c) for c in range(cp)],
        "dp_group": [at(t0, p0, d, c0) for d in range(dp)],
        "grad_sync_group": sorted(at(t0, p0, d, c) for d in range(dp) for c in range(cp)),
        "pp_group": pp_ranks,
        # Middle pipeline stages hold no embedding and belong to no embedding group.
        "embedding_group": embedding if rank in embedding else [rank],
        "model_parallel_group": sorted(at(t, p, d0, c0) for t in range(tp) for p in range(pp)),
    }


def members_by_collective(group) -> list[int]:
    """The ranks that contribute to an all-reduce over `group` (a group of one: just me)."""
    onehot = torch.zeros(dist.get_world_size())
    onehot[dist.get_rank()] = 1.0
    comm.all_reduce(onehot, group)
    return onehot.nonzero().flatten().tolist()


def _grid_checks() -> dict:
    results = {}
    for tp, pp, dp, cp, ep in LAYOUTS:
        grid = ParallelGrid(tp=tp, pp=pp, dp=dp, cp=cp, timeout_s=60, ep=ep)
        results[(tp, pp, dp, cp, ep)] = {
            "coord": (grid.tp_rank, grid.pp_rank, grid.dp_rank, grid.cp_rank),
            "ep_rank": grid.ep_rank,
            # the whole mapping ranks[pp, dp, cp, tp] against the formula, every coordinate
            "round_trip": grid.ranks.tolist() == [[[[expected_rank(t, p, d, c, tp, dp, cp)
                                                     for t in range(tp)] for c in range(cp)]
                                                   for d in range(dp)] for p in range(pp)],
            "members": {name: members_by_collective(getattr(grid, name)) for name in GROUPS},
            "first_last": (grid.is_first_stage, grid.is_last_stage),
            "one_pipeline_communicator": not hasattr(grid, "pp_grad_group"),
            "one_rank_groups_are_none": [name for name in GROUPS
                                         if getattr(grid, name) is None],
        }
    # the traffic log counts a broadcast with its bytes
    payload = torch.full((5,), float(dist.get_rank()), dtype=torch.float64)
    with traffic_log() as log:
        comm.broadcast(payload, src=0, group=dist.group.WORLD)
    results["broadcast"] = ([(r.kind, r.numel, r.nbytes) for r in log], payload.tolist())
    try:  # a bad layout fails before any collective, on every rank alike
        ParallelGrid(tp=3, pp=1, dp=1)
        results["bad"] = "no error"
    except ValueError as error:
        results["bad"] = str(error)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_grid_checks, world_size=WORLD, timeout_s=400)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_groups_connect_the_ranks_the_formula_names(ranks, layout):
    tp, pp, dp, cp, ep = layout
    for rank, result in enumerate(ranks):
        r = result[layout]
        t, p, d, c = r["coord"]
        assert expected_rank(t, p, d, c, tp, dp, cp) == rank
        assert r["ep_rank"] == (d * cp + c) % ep
        assert r["round_trip"]
        assert r["members"] == expected_groups(rank, tp, pp, dp, cp, ep)
        assert r["first_last"] == (p == 0, p == pp - 1)
        assert r["one_pipeline_communicator"]  # activations and gradients share pp_group
        # a group of one rank is never created: None, the "no communication" group
        expected = expected_groups(rank, tp, pp, dp, cp, ep)
        assert r["one_rank_groups_are_none"] == [name for name in GROUPS
                                                 if len(expected[name]) == 1]


def test_broadcast_is_counted_in_the_traffic_log(ranks):
    for r in ranks:
        assert r["broadcast"] == ([("broadcast", 5, 40)], [0.0] * 5)


def test_tensor_parallel_ranks_are_consecutive(ranks):
    assert ranks[1][(2, 2, 1, 1, 1)]["members"]["tp_group"] == [0, 1]
    assert ranks[3][(2, 1, 2, 1, 1)]["members"]["tp_group"] == [2, 3]
    assert ranks[2][(2, 1, 2, 1, 1)]["members"]["dp_group"] == [0, 2]
    # cp sits between tp and dp: the cp peers of rank 0 at tp=2 are two ranks away
    assert ranks[0][(2, 1, 1, 2, 1)]["members"]["cp_group"] == [0, 2]
    # ep groups are consecutive data-parallel ranks; an expert's replicas are ep ranks apart
    assert ranks[1][(1, 1, 4, 1, 2)]["members"]["ep_group"] == [0, 1]
    assert ranks[1][(1, 1, 4, 1, 2)]["members"]["expert_dp_group"] == [1, 3]


def test_bad_layout_is_a_clear_error_on_every_rank(ranks):
    for result in ranks:
        assert "world size 4 != tp*cp*pp*dp" in result["bad"]


def test_world_of_one_has_no_groups():
    grid = ParallelGrid()
    assert (grid.tp_rank, grid.pp_rank, grid.dp_rank, grid.cp_rank) == (0, 0, 0, 0)
    assert all(getattr(grid, name) is None for name in GROUPS)
    assert grid.is_first_stage and grid.is_last_stage and not grid.is_distributed


def test_layout_validation():
    validate_layout(8, 2, 2, 2)
    validate_layout(8, 2, 1, 2, cp=2)
    with pytest.raises(ValueError, match="parallel.tp/cp/pp/dp"):
        validate_layout(8, 2, 2, 1)
    with pytest.raises(ValueError, match="= 2\\*2\\*2\\*2 = 16"):
        validate_layout(8, 2, 2, 2, cp=2)
    with pytest.raises(ValueError, match="parallel.pp must be a positive integer"):
        validate_layout(8, 2, 0, 2)
    with pytest.raises(ValueError, match="parallel.cp must be a positive integer"):
        validate_layout(8, 2, 2, 2, cp=0)
    validate_layout(8, 1, 1, 4, cp=2, ep=8)
    with pytest.raises(ValueError, match="parallel.ep = 3 does not divide dp\\*cp"):
        validate_layout(8, 2, 1, 4, ep=3)


def _count_new_groups(monkeypatch, world: int, tp: int, pp: int, dp: int, cp: int
                      ) -> dict[int, list[tuple[int, ...]]]:
    """The new_group calls each rank of a `world` makes for a layout (no process group: the
    world is faked, new_group records its members and returns a stand-in)."""
    calls: dict[int, list[tuple[int, ...]]] = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    for rank in range(world):
        calls[rank] = []
        monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
        monkeypatch.setattr(dist, "new_group", lambda ranks, **kwargs: calls[rank].append(
            tuple(ranks)) or object())
        ParallelGrid(tp=tp, pp=pp, dp=dp, cp=cp)
    return calls


# (world, tp, pp, dp, cp) -> communicators needed: one per group of two or more ranks (tp, cp,
# dp, grad_sync unless it is dp, pp and embedding once per pipeline, model_parallel)
NEEDED = {(8, 8, 1, 1, 1): 1 + 1,                 # tp, model_parallel (the same 8 ranks)
          (8, 1, 1, 8, 1): 1,                     # dp (= grad_sync)
          (8, 1, 1, 1, 8): 1 + 1,                 # cp, grad_sync
          (8, 2, 1, 4, 1): 4 + 2 + 4,             # tp, dp, model_parallel
          (8, 2, 2, 2, 1): 4 + 4 + 2 * 4 + 2,     # tp, dp, pp x2 (messages, embedding), mp
          (16, 2, 2, 2, 2): 8 + 8 + 8 + 4 + 2 * 8 + 4,  # tp, cp, dp, grad_sync, pp x2, mp
          (4, 1, 4, 1, 1): 2 + 1}                 # pp x2, model_parallel (= the pp ranks)


@pytest.mark.parametrize("layout", sorted(NEEDED))
def test_only_groups_of_two_or_more_ranks_are_created(monkeypatch, layout):
    """With device_id bound every new_group splits the world's communicator: count them. Every
    rank makes the same calls in the same order (NCCL's rule), and none for a group of one."""
    calls = _count_new_groups(monkeypatch, *layout)
    assert all(calls[rank] == calls[0] for rank in calls)
    assert all(len(members) > 1 for members in calls[0])
    assert len(calls[0]) == NEEDED[layout]


def test_backend_choice_is_nccl_when_cuda_is_available_else_gloo(monkeypatch):
    """default_backend() picks by torch.cuda.is_available(); no NCCL group is created here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_backend() == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_backend() == "gloo"
