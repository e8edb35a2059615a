"""The multi-rank harness itself: results come back, errors carry the rank's traceback, hangs
time out instead of blocking the suite."""

import pytest
import torch
import torch.distributed as dist

from nanomt.testing import DistributedTestError, run_distributed


def _sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "sum": t}


def _rank_one_raises():
    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank one")
    return 0


def _rank_zero_hangs():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.zeros(1))  # rank 1 never joins
    return 0


def test_results_come_back_in_rank_order():
    results = run_distributed(_sum_of_ranks, world_size=3, timeout_s=120)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(torch.equal(r["sum"], torch.tensor([3.0])) for r in results)


def test_a_raising_rank_fails_with_its_traceback():
    with pytest.raises(DistributedTestError, match="rank 1 raised(.|\n)*boom on rank one"):
        run_distributed(_rank_one_raises, world_size=2, timeout_s=120)


def test_a_hang_times_out():
    with pytest.raises(DistributedTestError):
        run_distributed(_rank_zero_hangs, world_size=2, timeout_s=60, collective_timeout_s=5)
