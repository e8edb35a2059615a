"""Joining a launch: the shared key-value store, the attempt number, the world process group.

torchrun starts every worker with WORLD_SIZE, RANK and the address of a TCPStore that its
elastic agents keep for the whole job. After a rank dies, torchrun stops every worker and starts
them again, but the store stays, with the keys of the earlier attempts in it (their gloo/NCCL
addresses). A restarted world must therefore meet under a key prefix no earlier attempt used.

TORCHELASTIC_RESTART_COUNT cannot be that prefix across nodes: each agent counts its own
restarts, and an agent whose workers were still healthy when another node re-joined restarts
them without counting. So the ranks agree on the attempt themselves, through the store:

    rank 0:   attempt = add("attempts", 1) - 1;  answer every ticket with `attempt`
              until world_size - 1 ranks have arrived under it
    rank r:   ticket = add("tickets", 1);  attempt = get("welcome/<ticket>")  (waits)
              add("attempt_<attempt>/arrived", 1)

Every ticket is new (the counter only grows) and only the live rank 0 answers new tickets, since
torchrun stops all workers of an attempt before it starts any of the next: an answer is never
stale. The default group then lives under `nanomt/attempt_<attempt>/`. Keys meant to survive a
restart (the run folder's stamp) are written outside any attempt's prefix.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from nanomt.errors import CommunicationError

_LAUNCH_STORE: dist.Store | None = None  # one per process: the store of this launch
_ATTEMPT: int | None = None  # the attempt every rank agreed on, once joined


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def default_backend(use_cuda: bool = True) -> str:
    """NCCL when GPUs are present and used, gloo on CPU (also train.device=cpu on a GPU host)."""
    return "nccl" if use_cuda and torch.cuda.is_available() else "gloo"


def launch_store(timeout_s: float = 300.0) -> dist.Store | None:
    """The key-value store every rank of this launch meets at (None for a world of one).

    Under torchrun (TORCHELASTIC_USE_AGENT_STORE=True) it is the elastic agent's TCPStore at
    MASTER_ADDR:MASTER_PORT, joined as a client. Without torchrun's agent, rank 0 hosts it, as
    env:// would."""
    global _LAUNCH_STORE
    world_size = env_int("WORLD_SIZE", 1)
    if world_size == 1:
        return None
    if _LAUNCH_STORE is None:
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        is_master = not agent_store and env_int("RANK", 0) == 0
        _LAUNCH_STORE = dist.TCPStore(
            os.environ.get("MASTER_ADDR", "127.0.0.1"), env_int("MASTER_PORT", 29500),
            world_size, is_master=is_master, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s))
    return _LAUNCH_STORE


def launch_attempt() -> int:
    """Which start of this job the world is (0 for the first), the same on every rank."""
    return _ATTEMPT if _ATTEMPT is not None else 0


def agree_on_attempt(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> int:
    """The attempt number, agreed by every rank of this start (see the module docstring)."""
    if rank != 0:
        ticket = store.add("nanomt/tickets", 1)
        try:
            attempt = int(store.get(f"nanomt/welcome/{ticket}"))
        except dist.DistStoreError as error:
            raise CommunicationError(
                f"rank {rank} waited {timeout_s:g} s for rank 0 to start; it never did: see "
                f"rank 0's log, or raise parallel.init_timeout_s") from error
        store.add(f"nanomt/attempt_{attempt}/arrived", 1)
        return attempt
    attempt = store.add("nanomt/attempts", 1) - 1
    arrived_key, answered = f"nanomt/attempt_{attempt}/arrived", 0
    deadline = time.monotonic() + timeout_s
    while (arrived := store.add(arrived_key, 0)) < world_size - 1:
        tickets = store.add("nanomt/tickets", 0)
        if tickets > answered:  # earlier attempts' tickets too: nobody waits on those
            keys = [f"nanomt/welcome/{t}" for t in range(answered + 1, tickets + 1)]
            store.multi_set(keys, [str(attempt)] * len(keys))
            answered = tickets
        if time.monotonic() > deadline:
            raise CommunicationError(
                f"only {arrived + 1} of {world_size} ranks started within {timeout_s:g} s: see "
                f"the missing ranks' logs, or raise parallel.init_timeout_s")
        time.sleep(0.01)
    return attempt


def init_distributed(timeout_s: float = 300.0, init_timeout_s: float = 300.0,
                     use_cuda: bool = True, tf32: bool | None = None
                     ) -> tuple[int, int, torch.device]:
    """Join the launch's world (if launched by torchrun) and pick this rank's device.

    `timeout_s` bounds every collective on the world group; `init_timeout_s` bounds start-up
    (meeting at the store, building the groups); use_cuda=False keeps a GPU host on the CPU
    and gloo; tf32 (train.tf32) runs a GPU's fp32 matmuls on its TF32 tensor cores, or not
    (None: torch's default). Returns (rank, world_size, device). A plain
    `python -m nanomt.train` is a world of one and starts no process group at all.
    """
    global _ATTEMPT
    world_size, rank = env_int("WORLD_SIZE", 1), env_int("RANK", 0)
    device = torch.device("cpu")
    if use_cuda and torch.cuda.is_available():
        device = torch.device("cuda", env_int("LOCAL_RANK", 0))
        torch.cuda.set_device(device)
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    if world_size > 1 and not dist.is_initialized():
        store = launch_store(init_timeout_s)
        store.set_timeout(datetime.timedelta(seconds=init_timeout_s))
        _ATTEMPT = agree_on_attempt(store, rank, world_size, init_timeout_s)
        # NCCL: a collective past its timeout is aborted by the watchdog (an error, not a hang)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend=default_backend(use_cuda),
            store=dist.PrefixStore(f"nanomt/attempt_{_ATTEMPT}/", store),
            rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs)
    return rank, world_size, device


def leave_launch(exit_code: int = 0) -> None:
    """End this process after a run that finished: every rank meets at a barrier (no rank hangs
    up while a peer still talks to it), destroys the process groups, flushes its output and
    leaves with `exit_code` at once. Left to interpreter exit, torch's C++ threads (gloo's,
    the store's) are torn down in no fixed order, which now and then aborts a rank whose run
    succeeded ("terminate called without an active exception"), and torchrun then counts the
    launch as failed. A world of one (no process group) returns: the caller exits as usual."""
    global _LAUNCH_STORE
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    _LAUNCH_STORE = None
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def agree_on_run_stamp(stamp: str) -> str:
    """Every rank of a launch must use the same run folder: the first rank to ask decides.

    The key lives outside every attempt's prefix, so a restarted attempt gets the folder of the
    first one and `train.resume=auto` finds its checkpoints."""
    store = launch_store()
    if store is None:
        return stamp
    return store.compare_set("nanomt/run_stamp", "", stamp).decode()
