"""Saving a checkpoint atomically: a crash at any moment leaves the previous one whole.

    1. every rank writes its shard into  step_N.tmp/  and fsyncs it
    2. rank 0 writes meta.json (index, config, step, RNG of every rank), fsyncs it and the folder
    3. rename step_N.tmp -> step_N       (atomic on POSIX: the folder appears whole or not at all)
    4. write latest.tmp, rename -> latest (the pointer moves last)
    5. rename checkpoints of steps after N (a run that went back to an earlier step) to
       step_M.abandoned, then delete all but the newest `keep_last` of steps <= N

A reader only ever follows `latest`, which names a folder that was complete before the pointer
moved. A run killed during 1-3 leaves a stale step_N.tmp that the next save removes. Saving a
step that already exists renames the old copy to step_N.previous first; resolving `latest`
falls back to it if a crash came between the two renames, and it is removed once `latest`
names the new copy.

A save is collective in its verdict too: a rank that cannot write (disk full, permissions, an
injected fault) tells rank 0, which removes the partial folder instead of publishing it, and every
rank raises CheckpointWriteError together; `latest` never moves to a folder that is not whole.

`PreemptionSignal` turns SIGTERM (or the signal set in train.preempt_signal: what SLURM sends
before it kills a job) into a request that the training loop sees at the end of a step; all ranks
agree on it, save, and exit with ExitCode.PREEMPTED.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from torch import nn

from nanomt import faults
from nanomt.checkpoint.format import (
    ABANDONED_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST_FILE,
    META_FILE,
    PREVIOUS_SUFFIX,
    STEP_PREFIX,
    shard_file_name,
    step_folder_name,
)
from nanomt.checkpoint.stream import write_safetensors
from nanomt.checkpoint.state import (
    Grid,
    Optimizer,
    capture_rng,
    model_pieces,
    optimizer_pieces,
    stored_records,
)
from nanomt.errors import CheckpointWriteError
from nanomt.parallel import comm

# Tests set this to a function of the stage name to simulate a crash between two writes.
FAULT_HOOK = None


def _fault_point(stage: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(stage)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a rename is durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_shard(folder: Path, rank: int, pieces: list) -> dict:
    """One rank's safetensors file, streamed from the live tensors; returns its index entry."""
    index = [piece.to_json() for piece, _ in pieces]
    name = shard_file_name(rank)
    size, sha256 = write_safetensors(folder / name, [(piece.key, t) for piece, t in pieces],
                                     {"format": FORMAT_NAME, "pieces": json.dumps(index)})
    return {"file": name, "rank": rank, "bytes": size, "sha256": sha256, "pieces": index}


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete step folders under root, oldest first."""
    found = []
    for folder in root.glob(f"{STEP_PREFIX}*"):
        suffix = folder.name[len(STEP_PREFIX):]
        if suffix.isdigit() and (folder / META_FILE).exists():
            found.append((int(suffix), folder))
    return sorted(found)


def set_aside_abandoned(root: Path, step: int) -> None:
    """Checkpoints of steps after `step` belong to a lineage the run went back from (a resume
    from an earlier checkpoint): rename them out of the way, so they never count as the newest
    for keep_last nor get resumed by `auto`. Never deleted: a person decides."""
    for later_step, folder in list_checkpoints(root):
        if later_step > step:
            target = folder.with_name(folder.name + ABANDONED_SUFFIX)
            copy = 1
            while target.exists():
                target = folder.with_name(f"{folder.name}{ABANDONED_SUFFIX}.{copy}")
                copy += 1
            os.replace(folder, target)


def prune_checkpoints(root: Path, step: int, keep_last: int) -> None:
    """After `latest` names step `step`: remove stale temporary folders, set aside checkpoints
    of later steps, and remove all but the newest `keep_last` (0: keep all) of the rest."""
    pointer = root / LATEST_FILE
    latest = pointer.read_text().strip() if pointer.exists() else None
    for pattern in (f"{STEP_PREFIX}*.tmp", f"{STEP_PREFIX}*{PREVIOUS_SUFFIX}"):
        for folder in root.glob(pattern):
            shutil.rmtree(folder, ignore_errors=True)
    set_aside_abandoned(root, step)
    if keep_last <= 0:
        return
    complete = list_checkpoints(root)
    for _, folder in complete[: max(0, len(complete) - keep_last)]:
        if folder.name != latest:
            shutil.rmtree(folder, ignore_errors=True)


def _publish(tmp: Path, final: Path, root: Path) -> None:
    """Steps 3 and 4: rename the finished folder into place, then move the pointer."""
    _fault_point("before_rename")
    if final.exists():  # saved again at the same step: keep the old copy until latest moves
        previous = final.with_name(final.name + PREVIOUS_SUFFIX)
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
        _fault_point("between_renames")  # latest -> final is missing; resolve uses previous
    os.replace(tmp, final)
    fsync_path(root)
    _fault_point("before_latest")
    pointer_tmp = root / (LATEST_FILE + ".tmp")
    write_durably(pointer_tmp, (final.name + "\n").encode())
    os.replace(pointer_tmp, root / LATEST_FILE)
    fsync_path(root)


def _attempt(action: Callable[[], object]) -> str | None:
    """Run a file-system action; None if it worked, else what went wrong (for every rank)."""
    try:
        action()
        return None
    except OSError as error:
        return f"rank {comm.world_rank()}: {error}"


def _prepare_tmp(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
    tmp.mkdir()


def _finish_on_rank0(shards: list, tmp: Path, final: Path, root: Path, step: int, meta: dict,
                     has_optimizer: bool, include_rng: bool) -> str | None:
    """Rank 0: meta.json, then the renames; returns an error, or None once `latest` moved."""
    errors = [s["error"] for s in shards if "error" in s]
    if errors:
        return errors[0]
    rng = [s.pop("rng") for s in shards] if include_rng else []
    parameters = {name: record for s in shards for name, record in s.pop("parameters").items()}
    full_meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "step": step,
                 "has_optimizer": has_optimizer, **meta,
                 "parameters": dict(sorted(parameters.items())), "rng": rng, "shards": shards}

    def write_and_publish() -> None:
        write_durably(tmp / META_FILE, json.dumps(full_meta, indent=1, default=str).encode())
        fsync_path(tmp)
        _publish(tmp, final, root)

    return _attempt(write_and_publish)


def save_checkpoint(root: str | Path, step: int, chunks: list[nn.Module], optimizer: Optimizer,
                    grid: Grid, meta: dict, keep_last: int = 0,
                    include_rng: bool = True) -> Path:
    """Collective over all ranks: write checkpoint `step` under `root`; returns its folder.

    `meta` is what the run needs besides tensors (config, model config, layout, data/LR/loss-scaler
    state); this adds the index, the RNG state of every rank and the step. If any rank fails to
    write (disk full, permissions), every rank raises CheckpointWriteError together, the partial
    folder is removed and `latest` still names the previous checkpoint."""
    root = Path(root)
    rank = comm.world_rank()
    final = root / step_folder_name(step)
    tmp = root / (final.name + ".tmp")
    error = _attempt(lambda: _prepare_tmp(root, tmp)) if rank == 0 else None
    _raise_if_failed(comm.broadcast_object(error), root, final)

    pieces = list(model_pieces(chunks, optimizer, grid))  # views: copied as they are written
    if optimizer is not None:
        pieces += optimizer_pieces(optimizer, grid)
        meta = {**meta, "optimizer_scalars": optimizer.scalar_state()}  # Adam's step, loss scale
    shard: dict = {}

    def write_mine() -> None:
        faults.inject("save", step)
        shard.update(_write_shard(tmp, rank, pieces))

    error = _attempt(write_mine)
    if error is None:
        shard["rng"] = capture_rng(chunks, grid) if include_rng else None
        shard["parameters"] = stored_records(chunks)
        _fault_point("shards_written")
    shards = comm.gather_object(shard if error is None else {"error": error}, dst=0)

    if rank == 0:
        error = _finish_on_rank0(shards, tmp, final, root, step, meta, optimizer is not None,
                                 include_rng)
        if error is None:
            _prune_or_warn(root, step, keep_last)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    _raise_if_failed(comm.broadcast_object(error), root, final)
    return final


def _prune_or_warn(root: Path, step: int, keep_last: int) -> None:
    """Pruning old checkpoints is housekeeping: the new one is already `latest`."""
    error = _attempt(lambda: prune_checkpoints(root, step, keep_last))
    if error is not None:
        print(f"nanomt: warning: could not remove old checkpoints under {root}: {error}",
              flush=True)


def _raise_if_failed(error: str | None, root: Path, final: Path) -> None:
    if error is None:
        return
    pointer = root / LATEST_FILE
    latest = pointer.read_text().strip() if pointer.exists() else None
    kept = f"{latest} is still `latest`" if latest else "no earlier checkpoint exists"
    raise CheckpointWriteError(
        f"could not write checkpoint {final.name} under {root} ({error}); {kept}. Free space "
        f"or fix permissions on checkpoint.dir (checkpoint.on_error=continue retries at the next "
        f"interval)")


class PreemptionSignal:
    """Remembers a preemption signal (SIGTERM by default; SIGUSR1 under SLURM's --signal) so the
    loop can save and stop at the end of the current step (the trainer reads `received`, MAX
    over every rank, in a step's one host read: nanomt.train)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.received = False
        self.previous = {}
        for signum in signals:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
