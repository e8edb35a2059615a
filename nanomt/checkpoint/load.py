"""Loading a checkpoint into any layout: each rank reads only the slice it holds.

    full tensor  = the union of the pieces in the index (each element stored exactly once)
    my slice     = full[box of my tp shard] (zero rows past the real vocabulary: padding),
                   flattened and cut to [a, b) for a ZeRO shard
                 = the overlap of my slice with each stored piece, read with safetensors'
                   get_slice: the full tensor is never built

so a checkpoint written at (tp, pp, dp, zero) = (2, 2, 2, 1) loads at (1, 4, 2, 2) or on a single
process: the names are the single-process model's and the slices are recomputed for the reader.

Everything is checked before any tensor is used: the pointer, meta.json, that every shard file
exists with its recorded size and SHA-256, and that the model config matches. Loading never
writes into the checkpoint folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from nanomt.checkpoint.format import (
    LATEST_FILE,
    META_FILE,
    PREVIOUS_SUFFIX,
    CheckpointError,
    Piece,
    check_format,
    check_model_config,
    read_region,
)
from nanomt.checkpoint.state import (
    Grid,
    Optimizer,
    check_records,
    load_model,
    load_optimizer,
    pick_rng_state,
    reset_optimizer_state,
    restore_rng,
)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder, or a checkpoint root whose `latest` names one."""
    path = Path(path)
    if (path / META_FILE).exists():
        return path
    pointer = path / LATEST_FILE
    if not pointer.exists():
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path} does not exist: fix train.resume")
        raise CheckpointError(f"{path} holds neither {META_FILE} nor a {LATEST_FILE} pointer: "
                              f"pass a checkpoint folder in train.resume")
    target = path / pointer.read_text().strip()
    previous = target.with_name(target.name + PREVIOUS_SUFFIX)
    if not (target / META_FILE).exists() and (previous / META_FILE).exists():
        return previous  # a save of the same step was interrupted between its two renames
    if not (target / META_FILE).exists():
        raise CheckpointError(
            f"{pointer} points to {target.name}, which is missing or incomplete; point "
            f"{LATEST_FILE} at an existing step folder or pass one in train.resume")
    return target


def find_resume_checkpoint(resume: str, checkpoint_dir: Path) -> Path | None:
    """train.resume: none -> None; auto -> the latest in checkpoint_dir, if any; else a path."""
    if resume in ("none", "None", ""):
        return None
    if resume == "auto":
        if not (checkpoint_dir / LATEST_FILE).exists():
            return None  # nothing saved yet: a fresh start
        return resolve_checkpoint(checkpoint_dir)
    return resolve_checkpoint(resume)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {folder / META_FILE}: {error}") from error
    check_format(meta, str(folder / META_FILE))
    return meta


class MissingTensorError(CheckpointError, KeyError):
    """The checkpoint has no such tensor (a KeyError too: callers may treat it as optional)."""

    def __str__(self) -> str:
        return str(self.args[0])


class SafetensorsSource:
    """A stored piece inside an open safetensors file: reads only the requested part."""

    def __init__(self, handle: Any, key: str):
        self.handle, self.key = handle, key

    def box_slice(self, region: tuple[slice, ...]) -> torch.Tensor:
        if not region:
            return self.handle.get_tensor(self.key)
        return self.handle.get_slice(self.key)[region]

    def flat_slice(self, start: int, stop: int) -> torch.Tensor:
        stored = self.handle.get_slice(self.key)
        if len(stored.get_shape()) == 1:
            return stored[start:stop]
        return self.handle.get_tensor(self.key).reshape(-1)[start:stop]


class CheckpointReader:
    """The index of a checkpoint folder; reads slices of its tensors (or whole ones).

    Every shard's presence and size are checked up front; its SHA-256 the first time this rank
    reads from it (a rank reads only the shards holding tensors it needs). Shard files stay open
    while the reader lives (`with CheckpointReader(...) as reader:` closes them)."""

    def __init__(self, folder: Path, verify: bool = True):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.verify = verify
        self.pieces: dict[str, list[tuple[Path, Piece]]] = {}
        self.shard_of_file: dict[Path, dict] = {}
        self.hashed: set[Path] = set()
        self.handles: dict[Path, Any] = {}
        for shard in self.meta["shards"]:
            file = self.folder / shard["file"]
            self.shard_of_file[file] = shard
            self._check_size(file, shard)
            for values in shard["pieces"]:
                piece = Piece.from_json(values)
                self.pieces.setdefault(piece.key, []).append((file, piece))

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.handles.clear()  # safetensors closes a file when its handle is dropped

    def _check_size(self, file: Path, shard: dict) -> None:
        if not file.exists():
            raise CheckpointError(f"shard {file.name} (rank {shard['rank']}) is missing from "
                                  f"{self.folder}: the checkpoint is incomplete; resume from "
                                  f"an earlier one")
        size = file.stat().st_size
        if size != shard["bytes"]:
            raise CheckpointError(f"shard {file} is truncated or altered: {size} bytes, "
                                  f"{shard['bytes']} expected; resume from an earlier checkpoint")

    def _check_hash(self, file: Path) -> None:
        if not self.verify or file in self.hashed:
            return
        if _sha256(file) != self.shard_of_file[file]["sha256"]:
            raise CheckpointError(f"shard {file} is corrupted (SHA-256 differs from "
                                  f"{META_FILE}); resume from an earlier checkpoint")
        self.hashed.add(file)

    def _handle(self, file: Path) -> Any:
        if file not in self.handles:
            self._check_hash(file)
            try:
                self.handles[file] = safe_open(str(file), framework="pt")
            except Exception as error:  # noqa: BLE001 - safetensors raises several kinds
                raise CheckpointError(f"cannot open {file}: {error}; the file is "
                                      f"corrupted") from error
        return self.handles[file]

    def has(self, key: str) -> bool:
        return key in self.pieces

    def shape(self, key: str) -> list[int]:
        return self.pieces[key][0][1].shape

    def state_names(self, name: str) -> list[str]:
        """Optimizer states saved for parameter `name` (e.g. step, exp_avg, exp_avg_sq)."""
        found = []
        for key in self.pieces:
            section, _, rest = key.partition("/")
            if section == "optimizer":
                state_name, _, param_name = rest.partition("/")
                if param_name == name:
                    found.append(state_name)
        return sorted(found)

    def read(self, key: str, box: list[list[int]], flat: list[int] | None = None
             ) -> torch.Tensor:
        """Elements `box` (padded: rows past the real ones read as zero), then `flat` of them."""
        if key not in self.pieces:
            raise MissingTensorError(f"{key} is not in checkpoint {self.folder}")
        stored = [(piece, SafetensorsSource(self._handle(file), key))
                  for file, piece in self.pieces[key]]
        try:
            return read_region(stored, box, flat)
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - safetensors raises several kinds
            raise CheckpointError(f"cannot read {key} from {self.folder}: {error}; a shard "
                                  f"is corrupted") from error

    def full(self, key: str) -> torch.Tensor:
        """The whole tensor (export, scalars)."""
        if key not in self.pieces:
            raise MissingTensorError(f"{key} is not in checkpoint {self.folder}")
        return self.read(key, [[0, n] for n in self.shape(key)])


def load_checkpoint(path: str | Path, chunks: list[nn.Module], optimizer: Optimizer,
                    grid: Grid, model_config: dict, verify: bool = True) -> dict:
    """Load weights, optimizer state (if the checkpoint has it) and RNG into this rank.

    Returns meta.json (step, data and schedule state, loss-scaler state, config)."""
    folder = resolve_checkpoint(path)
    with CheckpointReader(folder, verify=verify) as reader:
        meta = reader.meta
        check_model_config(meta["model"], model_config, str(folder))
        check_records(meta["parameters"], chunks, str(folder))
        load_model(chunks, optimizer, reader, grid)
        if optimizer is not None and meta.get("has_optimizer", False):
            load_optimizer(optimizer, reader, grid)
            optimizer.load_scalar_state(meta["optimizer_scalars"])
        elif optimizer is not None:
            reset_optimizer_state(optimizer)
    if meta.get("rng"):
        restore_rng(pick_rng_state(meta["rng"], grid), chunks)
    meta["folder"] = str(folder)
    return meta
