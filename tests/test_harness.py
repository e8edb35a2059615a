"""The multi-rank harness itself: results come back, errors carry the rank's traceback, hangs
time out instead of blocking the suite (the collective timeout, or else the harness deadline)."""

import time

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


def _rank_one_stalls(seconds: float):
    """Every rank alive; rank 1 is stuck (asleep) while rank 0 waits for it in a collective."""
    if dist.get_rank() == 1:
        time.sleep(seconds)
    dist.all_reduce(torch.zeros(1))
    return 0


def test_results_come_back_in_rank_order():
    results = run_distributed(_sum_of_ranks, world_size=3, timeout_s=120)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(torch.equal(r["sum"], torch.tensor([3.0])) for r in results)


def test_a_raising_rank_fails_with_its_traceback():
    with pytest.raises(DistributedTestError, match="rank 1 raised(.|\n)*boom on rank one"):
        run_distributed(_rank_one_raises, world_size=2, timeout_s=120)


def test_a_stalled_peer_trips_the_collective_timeout():
    # Rank 0's all_reduce gives up after collective_timeout_s (gloo's own timeout, set by the
    # harness on the process group), long before rank 1 wakes or the harness deadline passes.
    start = time.monotonic()
    with pytest.raises(DistributedTestError,
                       match="rank 0 raised(.|\n)*Timed out waiting 3000ms"):
        run_distributed(_rank_one_stalls, world_size=2, args=(120,), timeout_s=90,
                        collective_timeout_s=3)
    assert time.monotonic() - start < 60


def test_a_stall_longer_than_the_deadline_trips_the_harness_deadline():
    # The collective timeout is longer than the deadline: the harness gives up on both ranks
    # (one asleep, one waiting) at timeout_s and kills them.
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"ranks \[0, 1\] did not finish within 6 s"):
        run_distributed(_rank_one_stalls, world_size=2, args=(120,), timeout_s=6,
                        collective_timeout_s=300)
    assert time.monotonic() - start < 60
