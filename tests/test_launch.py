"""Agreeing on the attempt through the launch store (nanomt.parallel.launch): every rank of a
start gets the same number, a later start a new one, whatever earlier starts left in the store.

Ranks are threads sharing one real TCPStore, as torchrun's workers share their agent's."""

from __future__ import annotations

import datetime
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch.distributed as dist

from nanomt.errors import CommunicationError
from nanomt.parallel.launch import agree_on_attempt

WORLD = 4


@pytest.fixture
def store():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))
    return server


def client(server: dist.TCPStore, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def start(server: dist.TCPStore, ranks: list[int], timeout_s: float = 20) -> list:
    """One start of `ranks` (each on its own store connection); their results or errors."""
    def join(rank: int):
        try:
            return agree_on_attempt(client(server, timeout_s), rank, WORLD, timeout_s)
        except CommunicationError as error:
            return error
    with ThreadPoolExecutor(len(ranks)) as pool:
        return list(pool.map(join, ranks))


def test_every_rank_of_a_start_agrees_and_each_start_gets_a_new_attempt(store):
    assert start(store, [3, 1, 0, 2]) == [0, 0, 0, 0]
    assert start(store, [0, 1, 2, 3]) == [1, 1, 1, 1]
    assert start(store, [2, 3, 1, 0]) == [2, 2, 2, 2]


def test_a_start_that_never_met_leaves_nothing_that_misleads_the_next(store):
    """Ranks 1 and 2 start without rank 0 (it died first) and give up; the next start, whose
    rank 3 is the first to take a ticket after theirs, must still agree on one attempt."""
    waited = start(store, [1, 2], timeout_s=0.5)
    assert all(isinstance(e, CommunicationError) and "for rank 0 to start" in str(e)
               and "parallel.init_timeout_s" in str(e) for e in waited)
    assert start(store, [3, 0, 2, 1]) == [0, 0, 0, 0]
    assert start(store, [1, 0, 3, 2]) == [1, 1, 1, 1]


def test_rank_0_names_how_many_ranks_came_when_some_never_do(store):
    results = start(store, [0, 2], timeout_s=1)
    assert isinstance(results[0], CommunicationError)
    assert "only 2 of 4 ranks started within 1 s" in str(results[0])
    assert "parallel.init_timeout_s" in str(results[0])
