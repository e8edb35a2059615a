"""How a run fails: one clear line and an exit code that says why.

A user launching on many nodes reads the first line of the first failing rank, and a scheduler
(torchrun, SLURM) reads the exit code. So every failure nanomt can name ends the process as

    nanomt: error: <what is wrong>; <the key to change, or what to do>

printed once (by global rank 0 for input errors, which every rank sees alike; by each rank for
failures only some ranks see), followed by `sys.exit(code)` with one of the codes below. The full
traceback is printed only with HYDRA_FULL_ERROR=1 or NANOMT_DEBUG=1.

    0  the run finished (or stopped at train.exit_after) and saved what it was asked to
    1  an unexpected error: a bug, or something nanomt does not name (the traceback is printed)
    2  bad input: configuration, data, tokenizer, checkpoint or output folder; nothing ran
    3  preempted: the preemption signal arrived, every rank saved one checkpoint and stopped;
       relaunch with train.resume=auto to continue
    4  the loss or gradient norm was not finite (bf16/fp32); the bad state was not saved
    5  a collective or point-to-point operation failed or timed out (a rank stalled or died)
    6  a checkpoint could not be written; the previous checkpoint is still `latest`
"""

from __future__ import annotations

import os
import sys
import traceback
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    BAD_INPUT = 2
    PREEMPTED = 3
    NON_FINITE = 4
    COMMUNICATION = 5
    CHECKPOINT_WRITE = 6


class NanomtError(Exception):
    """A failure nanomt can name: `str(error)` is the line after "nanomt: error: "."""

    exit_code = ExitCode.UNEXPECTED
    # True when every rank sees the same failure (then only rank 0 prints it)
    same_on_every_rank = False


class ConfigError(NanomtError, ValueError):
    """Bad input: `what` is wrong; `fix` names the key to change (or what to do)."""

    exit_code = ExitCode.BAD_INPUT
    same_on_every_rank = True

    def __init__(self, what: str, fix: str | None = None):
        super().__init__(f"{what}; {fix}" if fix else what)
        self.what, self.fix = what, fix


class NonFiniteError(NanomtError):
    exit_code = ExitCode.NON_FINITE
    same_on_every_rank = True


class RanksDisagree(NanomtError, AssertionError):
    """Ranks took different values of a decision that must be collective (a bug in nanomt):
    raised on every rank before the decision is acted on, instead of a collective mismatch."""

    same_on_every_rank = True


class CommunicationError(NanomtError):
    exit_code = ExitCode.COMMUNICATION


class CheckpointWriteError(NanomtError):
    exit_code = ExitCode.CHECKPOINT_WRITE
    same_on_every_rank = True


def debug_enabled() -> bool:
    return any(os.environ.get(name, "") not in ("", "0")
               for name in ("HYDRA_FULL_ERROR", "NANOMT_DEBUG"))


def exit_with(error: NanomtError) -> None:
    """Print the one line (on rank 0 only when every rank sees the same error) and exit."""
    rank = int(os.environ.get("RANK", "0"))
    if debug_enabled():
        traceback.print_exception(error, file=sys.stderr)
    if rank == 0 or not error.same_on_every_rank:
        prefix = "" if error.same_on_every_rank else f"[rank {rank}] "
        print(f"{prefix}nanomt: error: {error}", file=sys.stderr, flush=True)
    if error.exit_code == ExitCode.COMMUNICATION:
        # A peer died or stalled: the process group's threads may still be blocked on it, and
        # tearing them down at interpreter exit can abort the process (std::terminate), which
        # would hide this exit code. Leave at once instead; nothing is left to save.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(error.exit_code))
    sys.exit(int(error.exit_code))
