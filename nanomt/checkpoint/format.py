"""The checkpoint format: layout-independent names and slices.

A checkpoint is a folder

    step_00000100/
        meta.json               config, layout, step, data/LR/loss-scale state, every RNG state,
                                and the index: which shard file holds which slice of what
        rank_00000.safetensors  one file per rank (no pickle), possibly empty
        rank_00001.safetensors  ...

and a `latest` text file beside the step folders names the newest complete one.

Every tensor is stored under its name in the single-process model ("layers.7.attention.qkv.weight"
even when this rank's pipeline chunk calls it "layers.0..."), with the full shape and the slice
the shard holds, so any other layout can cut its own slices out again. Name, shape and slice come
from the parameter's ParamInfo (nanomt.parallel.param_info); this format knows no model names:

    piece = (key, name, shape, box, flat)
      shape  the full tensor's shape (vocabulary rows unpadded: tp-independent)
      box    [start, stop) per dim: the region of the full tensor this rank's tensor covers
             (a tensor-parallel shard covers 1/t of its split dim; a replica covers all of it);
             rows of dim 0 past `shape` are padding (the vocabulary's), never stored
      flat   optional [a, b): only elements a..b-1 of the box, flattened row-major
             (a ZeRO shard of the optimizer state holds a flat range of the rank's parameters)

Keys are "<section>/<name>": section "model" for weights, "optimizer/<state>" for optimizer
state (e.g. "optimizer/exp_avg/layers.0.mlp.fc1.weight").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from nanomt.errors import ConfigError

FORMAT_NAME = "nanomt-checkpoint"
# 2: llama's SwiGLU gate and up are one tensor, layers.<i>.mlp.fc1.weight [2, ffn, h] = [gate; up]
#    (version 1 stored them as mlp.gate.weight and mlp.fc1.weight, [ffn, h] each).
# 3: meta.json holds "parameters", every stored tensor's record (nanomt.parallel.param_info:
#    global shape, tp split dim, sequence-parallel partial, tied group), written from the model's
#    ParamInfo; a load checks the run's records against it.
FORMAT_VERSION = 3
META_FILE = "meta.json"
LATEST_FILE = "latest"
# step_N.previous: the old copy while step N is saved again; step_N.abandoned: a checkpoint past
# the step a run went back to (kept for inspection, never pruned, never resumed from by itself).
PREVIOUS_SUFFIX = ".previous"
ABANDONED_SUFFIX = ".abandoned"
STEP_PREFIX = "step_"

# Model-config fields that change the tensors a checkpoint holds or what they mean (dropout and
# the vocabulary padding multiple do not). seq_len shapes only gpt's learned position
# embedding: a llama (RoPE) run may resume with a longer context.
SHAPE_FIELDS = ("style", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size",
                "vocab_size", "tie_embeddings", "norm_eps", "rope_theta")
GPT_SHAPE_FIELDS = SHAPE_FIELDS + ("seq_len",)
# model.moe's (null when dense): the experts' tensors and which of them a token uses; the loss
# coefficients may change on resume.
MOE_SHAPE_FIELDS = ("num_experts", "top_k", "ffn_hidden_size", "every", "shared_experts")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked; the message says what to change."""


def check_format(meta: dict, where: str) -> None:
    """Refuse a meta.json that is not a nanomt checkpoint of this FORMAT_VERSION."""
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where} is not a {FORMAT_NAME} file")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where} is a {FORMAT_NAME} of version {meta.get('version')!r}; this nanomt reads "
            f"version {FORMAT_VERSION} (see docs/checkpoints.md): resume from a checkpoint "
            f"written by this version, or pass another checkpoint in train.resume")


def step_folder_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def shard_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


@dataclass
class Piece:
    """One stored tensor: a slice (box, optionally a flat range of it) of a full tensor."""

    key: str
    name: str
    shape: list[int]
    box: list[list[int]]
    flat: list[int] | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "Piece":
        return cls(**values)

    @property
    def numel(self) -> int:
        if self.flat is not None:
            return self.flat[1] - self.flat[0]
        return math.prod(stop - start for start, stop in self.box)


def section_key(section: str, name: str) -> str:
    return f"{section}/{name}"


# ---- slices -------------------------------------------------------------------------------------
def make_piece(key: str, name: str, tensor: torch.Tensor, shape: list[int],
               box: list[list[int]], flat: list[int] | None = None
               ) -> tuple[Piece, torch.Tensor] | None:
    """Clip a (possibly padded) slice to the full tensor's real rows; None if nothing is left.

    Rows are dim 0 and the layout is row-major, so dropping trailing rows of a box keeps the
    flat index of every remaining element: a flat range is clipped by cutting its end."""
    if shape and box and box[0][1] > shape[0]:
        start, stop = box[0]
        kept_rows = max(0, shape[0] - start)
        box = [[start, start + kept_rows]] + [list(b) for b in box[1:]]
        if flat is None:
            tensor = tensor[:kept_rows]
        else:
            row_numel = math.prod(b[1] - b[0] for b in box[1:])
            end = min(flat[1], kept_rows * row_numel)
            if end <= flat[0]:
                return None
            tensor = tensor[: end - flat[0]]
            flat = [flat[0], end]
        if kept_rows == 0:
            return None
    piece = Piece(key=key, name=name, shape=list(shape), box=box, flat=flat)
    return piece, tensor.detach().contiguous()


class PieceSource(Protocol):
    """Where a stored piece's values come from: a safetensors slice, or a tensor in tests."""

    def box_slice(self, region: tuple[slice, ...]) -> torch.Tensor: ...

    def flat_slice(self, start: int, stop: int) -> torch.Tensor: ...


class TensorSource:
    """A piece held in memory (tests, and anything that already has the tensor)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def box_slice(self, region: tuple[slice, ...]) -> torch.Tensor:
        return self.tensor[region]

    def flat_slice(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor.reshape(-1)[start:stop]


def _rows_of_flat(box: list[list[int]], flat: list[int] | None) -> tuple[int, int, int]:
    """(first row, end row, elements per row) of the rows of `box` that `flat` touches."""
    row_numel = math.prod(stop - start for start, stop in box[1:])
    if flat is None:
        return box[0][0], box[0][1], row_numel
    first = box[0][0] + flat[0] // row_numel
    end = box[0][0] + -(-flat[1] // row_numel)
    return first, end, row_numel


def _place(piece: Piece, source: PieceSource, out: torch.Tensor | None,
           covered: torch.Tensor, region: list[list[int]]) -> torch.Tensor | None:
    """Copy the part of one stored piece that overlaps `region` into `out` (rows x rest)."""
    first, end, row_numel = _rows_of_flat(piece.box, piece.flat)
    rows = [max(first, region[0][0]), min(end, region[0][1])]
    rest = [[max(b[0], r[0]), min(b[1], r[1])] for b, r in zip(piece.box[1:], region[1:])]
    if any(start >= stop for start, stop in [rows] + rest):
        return out
    dst = tuple(slice(a - r[0], b - r[0]) for (a, b), r in zip([rows] + rest, region))
    if piece.flat is None:
        src = tuple(slice(a - b[0], z - b[0]) for (a, z), b in zip([rows] + rest, piece.box))
        values, mask = source.box_slice(src), None
    else:  # whole rows of the box, only the elements of the flat range valid
        lo = (rows[0] - piece.box[0][0]) * row_numel
        hi = (rows[1] - piece.box[0][0]) * row_numel
        a, b = max(lo, piece.flat[0]), min(hi, piece.flat[1])
        flat_values = source.flat_slice(a - piece.flat[0], b - piece.flat[0]).reshape(-1)
        row_shape = [rows[1] - rows[0]] + [stop - start for start, stop in piece.box[1:]]
        buffer = torch.zeros(row_shape, dtype=flat_values.dtype)
        mask = torch.zeros(row_shape, dtype=torch.bool)
        buffer.view(-1)[a - lo: b - lo] = flat_values
        mask.view(-1)[a - lo: b - lo] = True
        src = (slice(None),) + tuple(slice(a - bx[0], z - bx[0])
                                     for (a, z), bx in zip(rest, piece.box[1:]))
        values, mask = buffer[src], mask[src]
    if out is None:
        out = torch.zeros(covered.shape, dtype=values.dtype)
    if mask is None:
        out[dst] = values.reshape(out[dst].shape)
        covered[dst] = True
    else:
        out[dst] = torch.where(mask, values, out[dst])
        covered[dst] |= mask
    return out


def read_region(stored: list[tuple[Piece, PieceSource]], box: list[list[int]],
                flat: list[int] | None = None) -> torch.Tensor:
    """The slice `box` (then elements `flat` of it, row-major) of a stored tensor.

    Only the stored pieces overlapping the slice are read, and only their overlapping part;
    rows past the stored (real) rows are padding: zero."""
    first = stored[0][0]
    if not first.shape:  # a scalar
        return stored[0][1].box_slice(())
    rows_start, rows_end, row_numel = _rows_of_flat(box, flat)
    region = [[rows_start, rows_end]] + [list(b) for b in box[1:]]
    covered = torch.zeros([stop - start for start, stop in region], dtype=torch.bool)
    out = None
    for piece, source in stored:
        out = _place(piece, source, out, covered, region)
    real_rows = max(0, min(rows_end, first.shape[0]) - rows_start)
    if out is None and real_rows == 0:  # only padding rows
        dtype = stored[0][1].box_slice((slice(0, 0),)).dtype
        out = torch.zeros(covered.shape, dtype=dtype)
    if out is None or not bool(covered[:real_rows].all()):
        raise CheckpointError(
            f"the checkpoint's pieces of {first.key} do not cover the slice {box} of it: a "
            f"shard is missing or the checkpoint is inconsistent")
    if flat is None:
        return out
    offset = (rows_start - box[0][0]) * row_numel
    return out.reshape(-1)[flat[0] - offset: flat[1] - offset]


def check_model_config(saved: dict, current: dict, where: str) -> None:
    """Refuse a checkpoint whose tensors belong to a different model."""
    fields = GPT_SHAPE_FIELDS if current.get("style", "gpt") == "gpt" else SHAPE_FIELDS
    saved_moe, moe = saved.get("moe") or {}, current.get("moe") or {}
    if moe and moe.get("every", 1) == 1:  # every layer has experts: the dense width shapes nothing
        fields = tuple(key for key in fields if key != "ffn_hidden_size")
    differences = [f"model.{key}: checkpoint {saved.get(key)!r}, run {current.get(key)!r}"
                   for key in fields if saved.get(key) != current.get(key)]
    differences += [f"model.moe.{key}: checkpoint {saved_moe.get(key)!r}, run {moe.get(key)!r}"
                    for key in MOE_SHAPE_FIELDS if saved_moe.get(key) != moe.get(key)]
    if differences:
        raise CheckpointError(
            f"checkpoint {where} was saved for a different model ("
            + "; ".join(differences) + "): change the model config to match, or pass "
            "another checkpoint in train.resume")
