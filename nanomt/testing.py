"""Run a function on N ranks (gloo, CPU, spawned processes) and bring back what each returned.
With `pytest --backend nccl` the ranks also speak NCCL, one GPU each (`distributed_test_backend`).

Multi-rank tests are dominated by process start-up (importing torch costs about 2 s a process on
a small machine), so one spawn should run many checks: `fn` can build several models, compare
them and return a dict of results, which the test then asserts on.

    results = run_distributed(my_checks, world_size=4, args=(cfg,), timeout_s=120)

Guarantees:
  - a rank that raises fails the call with that rank's own traceback,
  - a rank that hangs (a mismatched collective) fails the call after `timeout_s` instead of
    hanging the suite: every collective also carries the process-group timeout,
  - results come back through torch.save bytes, so tensors survive the child exiting.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanomt.config import compose_config as _compose_config

if TYPE_CHECKING:
    from omegaconf import DictConfig


# The ranks' backend: gloo, or under `pytest --backend nccl` (tests/conftest.py sets this) NCCL
# for CUDA tensors beside gloo for CPU ones, one GPU per rank: runs through nanomt.train.run
# (train.device=auto) then train on the GPUs and talk over NCCL.
TEST_BACKEND_ENV = "NANOMT_TEST_BACKEND"
START_TIMEOUT_S = 120.0  # for the ranks to meet at the store (not a collective timeout)


def distributed_test_backend() -> str:
    """gloo (the default: CPU, CI) or nccl (pytest --backend nccl)."""
    return os.environ.get(TEST_BACKEND_ENV, "gloo")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """nanomt.config.compose_config for tests; under the nccl backend with TF32 off, since the
    tests compare fp32 numbers at fp32 tolerances."""
    overrides = list(overrides or [])
    if distributed_test_backend() == "nccl":
        overrides.append("train.tf32=false")
    return _compose_config(overrides)


def _init_test_process_group(rank: int, world_size: int, port: int,
                             collective_timeout_s: float) -> None:
    """The world group with `collective_timeout_s` on its collectives. Meeting at the store
    has a timeout of its own (START_TIMEOUT_S): on a loaded machine the ranks' processes may
    start seconds apart, which a test's short collective timeout must not fail."""
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    if distributed_test_backend() != "nccl":
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
        return
    device = torch.device("cuda", rank)  # one GPU per rank
    torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=rank,
                            world_size=world_size, timeout=timeout, device_id=device)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict,
            results: mp.Queue, collective_timeout_s: float, env: dict) -> None:
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)  # N ranks share a couple of cores
    try:
        _init_test_process_group(rank, world_size, port, collective_timeout_s)
        value = fn(*args, **kwargs)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


class DistributedTestError(AssertionError):
    """A rank raised, or the ranks did not finish in time."""


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple = (),
                    kwargs: dict | None = None, timeout_s: float = 180.0,
                    collective_timeout_s: float = 60.0, env: dict | None = None) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks (`distributed_test_backend`); return
    the list of per-rank results.

    `fn` must be importable (a module-level function) since ranks are spawned processes.
    """
    if distributed_test_backend() == "nccl" and world_size > torch.cuda.device_count():
        import pytest  # test support: only a test calls this

        pytest.skip(f"--backend nccl: {world_size} ranks need {world_size} GPUs (one rank per "
                    f"GPU), {torch.cuda.device_count()} found")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(rank, world_size, port, fn, args, kwargs or {}, results,
                               collective_timeout_s, env or {}))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    collected: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(collected))
                raise DistributedTestError(
                    f"ranks {missing} did not finish within {timeout_s:.0f} s "
                    f"(a hang or a mismatched collective?)" + _first_error(collected))
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None) and r not in collected]
                if dead:
                    time.sleep(0.5)  # let a dying rank's message arrive first
                    if results.empty():
                        raise DistributedTestError(
                            f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                            + _first_error(collected))
                continue
            collected[rank] = (status, payload)
            if status == "error":  # fail fast: the others are probably stuck waiting for it
                raise DistributedTestError(f"rank {rank} raised:\n{payload}")
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(collected) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return [torch.load(io.BytesIO(collected[r][1]), weights_only=False)
            for r in range(world_size)]


def _first_error(collected: dict) -> str:
    for rank, (status, payload) in sorted(collected.items()):
        if status == "error":
            return f"\nrank {rank} raised:\n{payload}"
    return ""
