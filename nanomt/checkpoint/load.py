"""Loading a checkpoint into any layout: reassemble each full tensor, cut this rank's slice.

    full tensor  = the union of the pieces in the index (each element stored exactly once)
    my slice     = full[box of my tp shard] (zero rows past the real vocabulary: padding),
                   flattened and cut to [a, b) for a ZeRO shard

so a checkpoint written at (tp, pp, dp, zero) = (2, 2, 2, 1) loads at (1, 4, 2, 2) or on a single
process: the names are the single-process model's and the slices are recomputed for the reader.

Everything is checked before any tensor is used: the pointer, meta.json, that every shard file
exists with its recorded size and SHA-256, and that the model config matches. Loading never
writes into the checkpoint folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from nanomt.checkpoint.format import (
    FORMAT_NAME,
    LATEST_FILE,
    META_FILE,
    CheckpointError,
    Piece,
    assemble,
    check_model_config,
    cut,
)
from nanomt.checkpoint.state import (
    load_model,
    load_optimizer,
    pick_rng_state,
    reset_optimizer_state,
    restore_rng,
    whole_parameters,
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
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{folder / META_FILE} is not a {FORMAT_NAME} file")
    return meta


class MissingTensorError(CheckpointError, KeyError):
    """The checkpoint has no such tensor (a KeyError too: callers may treat it as optional)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class StoredPiece:
    file: Path
    piece: Piece


class CheckpointReader:
    """The index of a checkpoint folder; reads full tensors and slices of them.

    Every shard's presence and size are checked up front; its SHA-256 the first time this rank
    reads from it (a rank reads only the shards holding tensors it needs)."""

    def __init__(self, folder: Path, verify: bool = True):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.verify = verify
        self.pieces: dict[str, list[StoredPiece]] = {}
        self.shard_of_file: dict[Path, dict] = {}
        self.hashed: set[Path] = set()
        for shard in self.meta["shards"]:
            file = self.folder / shard["file"]
            self.shard_of_file[file] = shard
            self._check_size(file, shard)
            for values in shard["pieces"]:
                piece = Piece.from_json(values)
                self.pieces.setdefault(piece.key, []).append(StoredPiece(file, piece))

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

    def has(self, key: str) -> bool:
        return key in self.pieces

    def shape(self, key: str) -> list[int]:
        return self.pieces[key][0].piece.shape

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

    def full(self, key: str) -> torch.Tensor:
        if key not in self.pieces:
            raise MissingTensorError(f"{key} is not in checkpoint {self.folder}")
        loaded = []
        for stored in self.pieces[key]:
            self._check_hash(stored.file)
            try:
                with safe_open(str(stored.file), framework="pt") as f:
                    loaded.append((stored.piece, f.get_tensor(key)))
            except Exception as error:  # noqa: BLE001 - safetensors raises several kinds
                raise CheckpointError(f"cannot read {key} from {stored.file}: {error}; the file "
                                      f"is corrupted") from error
        return assemble(loaded)

    def read(self, key: str, padded_shape: list[int], box: list[list[int]],
             flat: list[int] | None = None) -> torch.Tensor:
        return cut(self.full(key), padded_shape, box, flat)


def load_checkpoint(path: str | Path, chunks: list[nn.Module], optimizer, grid,
                    model_config: dict, verify: bool = True) -> dict:
    """Load weights, optimizer state (if the checkpoint has it) and RNG into this rank.

    Returns meta.json (step, data and schedule state, loss-scaler state, config)."""
    folder = resolve_checkpoint(path)
    reader = CheckpointReader(folder, verify=verify)
    meta = reader.meta
    check_model_config(meta["model"], model_config, str(folder))
    with whole_parameters(optimizer, writeback=True):
        load_model(chunks, reader, grid)
    if optimizer is not None and meta.get("has_optimizer", False):
        load_optimizer(optimizer, chunks, reader, grid)
        if meta.get("optimizer_scalars") and hasattr(optimizer, "load_scalar_state"):
            optimizer.load_scalar_state(meta["optimizer_scalars"])
    elif optimizer is not None:
        reset_optimizer_state(optimizer)
    if meta.get("rng"):
        restore_rng(pick_rng_state(meta["rng"], grid), chunks)
    meta["folder"] = str(folder)
    return meta
