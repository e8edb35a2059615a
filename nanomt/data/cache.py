"""Index arrays built once, stored as .npy files keyed by a hash of their inputs, mapped after.

A dataset's indices (document order, sample starts, shuffle, blend choice) are a pure function of
a few inputs: the corpus index file, the split, seq_len, the seed, the sample count. Their hash
names the files, so a second start-up finds and memory-maps them (no rebuild), and a changed
input gives another name (a rebuild, never a stale index). In a distributed run global rank 0
builds while the others wait, then everyone maps the same files (the cache folder must be
shared by all nodes, like the checkpoint folder).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

CACHE_VERSION = "nanomt-indices-v1"


def default_cache_dir() -> Path:
    """$NANOMT_CACHE, else ~/.cache/nanomt: where text corpora are preprocessed."""
    return Path(os.environ.get("NANOMT_CACHE", Path.home() / ".cache" / "nanomt"))


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 16 MiB blocks (once per process while it is unchanged)."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def cache_key(description: dict) -> str:
    """A short hash of everything an index depends on (a JSON-serialisable dict)."""
    text = json.dumps({"version": CACHE_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class IndexCache:
    """The .npy files of one index: `<folder>/<stem>.<key>.<name>.npy`, plus a .json written last
    that marks the set complete and says what it was built from."""

    def __init__(self, folder: Path, stem: str, description: dict) -> None:
        self.folder, self.description = Path(folder), description
        self.base = f"{stem}.{cache_key(description)}"
        self.builds = 0  # how often this process built rather than loaded (tests read it)

    def path(self, name: str) -> Path:
        return self.folder / f"{self.base}.{name}.npy"

    @property
    def marker(self) -> Path:
        return self.folder / f"{self.base}.json"

    def exists(self) -> bool:
        return self.marker.is_file()

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            tmp = self.folder / f"{self.base}.{name}.tmp{os.getpid()}.npy"
            np.save(tmp, array)
            os.replace(tmp, self.path(name))
        tmp = self.marker.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**self.description, "arrays": sorted(arrays)}, indent=1))
        os.replace(tmp, self.marker)

    def load(self, names: list[str]) -> dict[str, np.ndarray]:
        return {name: np.load(self.path(name), mmap_mode="r") for name in names}

    def get(self, names: list[str], build: Callable[[], dict[str, np.ndarray]]
            ) -> dict[str, np.ndarray]:
        """The arrays, from the cache or built (on global rank 0 only) and saved first."""
        def build_and_save() -> None:
            if not self.exists():
                self.save(build())
                self.builds += 1
        on_rank_zero(build_and_save)
        return self.load(names)


def on_rank_zero(work: Callable[[], None], heartbeat_s: float = 5.0) -> None:
    """Run `work` on global rank 0 while the other ranks wait; a failure there fails everyone.

    The wait may outlast the collective timeout (parallel.timeout_s): tokenizing a corpus or
    choosing the blend of an MT-NLG-sized run takes minutes. So rank 0 works in a thread and
    tells the others every `heartbeat_s` whether it is done; each of those broadcasts is short,
    and a rank 0 that died still fails the others within the timeout."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        work()
        return
    from nanomt.parallel import comm

    if dist.get_rank() == 0:
        outcome: dict[str, str | None] = {}

        def run() -> None:
            try:
                work()
                outcome["error"] = None
            except Exception as problem:  # noqa: BLE001 - shared with every rank, then raised
                outcome["error"] = f"{type(problem).__name__}: {problem}"

        worker = threading.Thread(target=run, name="nanomt-rank0-build", daemon=True)
        worker.start()
        while True:
            worker.join(timeout=heartbeat_s)
            status = comm.broadcast_object("working" if worker.is_alive()
                                           else ("done", outcome.get("error", "the build died")))
            if status != "working":
                break
    else:
        while (status := comm.broadcast_object(None)) == "working":
            pass
    error = status[1]
    if error is not None:
        raise RuntimeError(f"building data indices on rank 0 failed: {error}")
