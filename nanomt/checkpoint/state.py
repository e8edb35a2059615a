"""What a rank contributes to a checkpoint, and how it takes its share back.

Model weights: each rank holds a list of GPT chunks (one, or several under pipeline parallelism
with virtual stages), each knowing its global `layer_range`. A tensor-parallel shard covers
1/t of its `tp_split_dim`; a replicated tensor (norms, row-parallel biases, positions) is written
by tp rank 0 only, and every tensor by dp rank 0 only (the other replicas hold the same values).

Optimizer state, two shapes of it:
  - per parameter (torch.optim.AdamW): `state[param]` = {step, exp_avg, exp_avg_sq}; tensors of
    the parameter's shape are sliced like the parameter, scalars (step) are replicated.
  - flat shards (ZeRO, see nanomt/optim/sharded_adamw.py): the optimizer exposes
    `checkpoint_state()` -> a list of (param, state_name, tensor, flat_range) where flat_range
    is [a, b) of the parameter's flattened local (tp-shard) tensor held by this dp rank, and
    `load_checkpoint_state(read)` with read(param, state_name, flat_range) -> tensor. Every dp
    rank writes its own range (at stage 0, where each holds everything, dp rank 0 only). Its
    scalars (Adam step, loss scale) go to meta.json via `scalar_state()`. Under ZeRO-3 the
    weights too are written as flat pieces of each dp rank's shard and read back into it.

RNG: Python's, torch's CPU (and CUDA) generators and each chunk's tensor-parallel tracker.
"""

from __future__ import annotations

import base64
import random
from typing import Any, Optional

import torch
from torch import nn

from nanomt.parallel.grid import ParallelGrid

from nanomt.checkpoint.format import (
    Piece,
    logical_shape,
    make_piece,
    named_chunk_parameters,
    padded_box,
    section_key,
)

MODEL_SECTION = "model"

Grid = Optional[ParallelGrid]  # None: a single process
# A torch optimizer (per-parameter state) or a flat-shard one speaking the protocol above.
Optimizer = Any
# A nanomt.checkpoint.load.CheckpointReader (not imported here: load imports this module).
Reader = Any


def weight_shards(optimizer: Optimizer
                  ) -> list[tuple[nn.Parameter, torch.Tensor, tuple[int, int]]] | None:
    """ZeRO-3's weights as this dp rank holds them: (param, its shard view, (lo, hi)) with
    elements [lo, hi) of the flattened (tp-local) parameter; None when weights are whole.

    Saving writes these flat pieces from every dp rank and loading fills them in place, so no
    rank ever gathers the model."""
    if getattr(optimizer, "stage", None) != 3:
        return None
    return optimizer.parameter_shards()


def optimizer_section(state_name: str) -> str:
    return f"optimizer/{state_name}"


def writes_replicas(grid: Grid) -> bool:
    return grid is None or (grid.dp_rank == 0 and grid.cp_rank == 0)


def _tp(grid: Grid) -> tuple[int, int]:
    return (0, 1) if grid is None else (grid.tp_rank, grid.tp_size)


def _param_piece(section: str, name: str, param: nn.Parameter, tensor: torch.Tensor, grid: Grid,
                 vocab_size: int, flat: list[int] | None = None):
    """The piece of `tensor` (the param itself, or state of the param's shape, or a flat range)."""
    tp_rank, tp_size = _tp(grid)
    split_dim = getattr(param, "tp_split_dim", None)
    padded, box = padded_box(tuple(param.shape), split_dim, tp_rank, tp_size)
    return make_piece(section_key(section, name), name, tensor, logical_shape(name, padded,
                      vocab_size), box, flat)


def _stores_param(param: nn.Parameter, owned: bool, grid: Grid) -> bool:
    """Only one copy of every value: tp rank 0 for replicated tensors, and owned tensors only."""
    tp_rank, _ = _tp(grid)
    replicated = getattr(param, "tp_split_dim", None) is None
    return owned and (not replicated or tp_rank == 0)


def model_pieces(chunks: list[nn.Module], optimizer: Optimizer, grid: Grid,
                 vocab_size: int) -> list[tuple[Piece, torch.Tensor]]:
    names = parameter_names(chunks)
    shards = weight_shards(optimizer)
    if shards is not None:  # ZeRO-3: every dp rank writes its own flat range of each weight
        values = [(param, shard.detach().to("cpu", copy=True), list(flat))
                  for param, shard, flat in shards]
    elif writes_replicas(grid):
        values = [(param, param.detach().to("cpu", copy=True), None) for param in names]
    else:
        return []
    pieces = []
    for param, value, flat in values:
        name, owned = names[param]
        if _stores_param(param, owned, grid):
            piece = _param_piece(MODEL_SECTION, name, param, value, grid, vocab_size, flat)
            if piece is not None:
                pieces.append(piece)
    return pieces


def parameter_names(chunks: list[nn.Module]) -> dict[nn.Parameter, tuple[str, bool]]:
    return {param: (name, owned) for chunk in chunks
            for name, param, owned in named_chunk_parameters(chunk)}


def optimizer_pieces(optimizer: Optimizer, chunks: list[nn.Module], grid: Grid,
                     vocab_size: int) -> list[tuple[Piece, torch.Tensor]]:
    """Pieces of the optimizer state (per-parameter, or flat ZeRO shards)."""
    names = parameter_names(chunks)
    pieces = []
    if hasattr(optimizer, "checkpoint_state"):  # flat shards: every dp rank writes its own
        if getattr(optimizer, "stage", None) == 0 and not writes_replicas(grid):
            return []  # ZeRO stage 0: every dp rank holds the whole state
        for param, state_name, tensor, flat in optimizer.checkpoint_state():
            name, owned = names[param]
            if _stores_param(param, owned, grid):
                piece = _param_piece(optimizer_section(state_name), name, param, tensor, grid,
                                     vocab_size, list(flat))
                if piece is not None:
                    pieces.append(piece)
        return pieces
    if not writes_replicas(grid):
        return []
    for param, state in optimizer.state.items():
        name, owned = names[param]
        for state_name, value in state.items():
            value = torch.as_tensor(value)
            if value.shape == param.shape:
                if _stores_param(param, owned, grid):
                    piece = _param_piece(optimizer_section(state_name), name, param, value, grid,
                                         vocab_size)
                    if piece is not None:
                        pieces.append(piece)
            elif _stores_param(param, owned, grid) and (_tp(grid)[0] == 0):
                key = section_key(optimizer_section(state_name), name)  # a scalar: step
                pieces.append(make_piece(key, name, value.reshape(()), [], []))
    return pieces


# ---- loading ----------------------------------------------------------------------------------
def weight_key(reader: Reader, name: str) -> str:
    """The most exact copy of a weight: the fp32 master of a bf16/fp16 run, if saved."""
    master = section_key(optimizer_section("master"), name)
    return master if reader.has(master) else section_key(MODEL_SECTION, name)


def _box(param: nn.Parameter, grid: Grid) -> list[list[int]]:
    tp_rank, tp_size = _tp(grid)
    return padded_box(tuple(param.shape), getattr(param, "tp_split_dim", None), tp_rank,
                      tp_size)[1]


@torch.no_grad()
def load_model(chunks: list[nn.Module], optimizer: Optimizer, reader: Reader,
               grid: Grid) -> None:
    """Copy this rank's slice of every parameter (under ZeRO-3: of its shard) out of the
    checkpoint."""
    names = parameter_names(chunks)
    shards = weight_shards(optimizer)
    if shards is not None:
        for param, shard, flat in shards:
            name, _ = names[param]
            shard.copy_(reader.read(weight_key(reader, name), _box(param, grid), list(flat)))
        return
    for param, (name, _) in names.items():
        value = reader.read(weight_key(reader, name), _box(param, grid), None)
        param.copy_(value.view(param.shape))


def load_optimizer(optimizer: Optimizer, chunks: list[nn.Module], reader: Reader,
                   grid: Grid) -> None:
    """Rebuild this rank's optimizer state from the checkpoint's full tensors."""
    names = parameter_names(chunks)

    def read(param: nn.Parameter, state_name: str,
             flat: tuple[int, int] | None = None) -> torch.Tensor:
        name, _ = names[param]
        key = section_key(optimizer_section(state_name), name)
        return reader.read(key, _box(param, grid), list(flat) if flat is not None else None)

    if hasattr(optimizer, "load_checkpoint_state"):
        optimizer.load_checkpoint_state(read)
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            name, _ = names[param]
            state = {}
            for state_name in reader.state_names(name):
                key = section_key(optimizer_section(state_name), name)
                if reader.shape(key) == []:  # a scalar such as step
                    state[state_name] = reader.full(key)
                else:
                    state[state_name] = read(param, state_name).reshape(param.shape).clone()
                state[state_name] = state[state_name].to(param.device)
            if state:
                optimizer.state[param] = state


def reset_optimizer_state(optimizer: Optimizer) -> None:
    """A checkpoint without optimizer state (an imported model): fresh moments for the loaded
    weights (flat-shard optimizers must still copy the new weights into their masters)."""
    if hasattr(optimizer, "load_checkpoint_state"):
        def fresh(param: nn.Parameter, state_name: str, flat: tuple[int, int]) -> torch.Tensor:
            if state_name == "master":
                raise KeyError(state_name)  # taken from the loaded weights
            return torch.zeros(flat[1] - flat[0])

        optimizer.load_checkpoint_state(fresh)
    else:
        optimizer.state.clear()


# ---- random number generators ------------------------------------------------------------------
def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng(chunks: list[nn.Module], grid: Grid) -> dict:
    """This rank's generator states, JSON-ready."""
    version, internal, gauss = random.getstate()
    coord = (0, 0, 0) if grid is None else (grid.tp_rank, grid.pp_rank, grid.dp_rank)
    return {
        "coord": {"tp": coord[0], "pp": coord[1], "dp": coord[2]},
        "python": [version, list(internal), gauss],
        "torch_cpu": _encode(torch.get_rng_state()),
        "cuda": _encode(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "tp_trackers": [{key: _encode(value) for key, value in chunk.rng.state_dict().items()}
                        for chunk in chunks if hasattr(chunk, "rng")],
    }


def restore_rng(state: dict, chunks: list[nn.Module]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(_decode(state["torch_cpu"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(state["cuda"]))
    trackers = [chunk.rng for chunk in chunks if hasattr(chunk, "rng")]
    for tracker, encoded in zip(trackers, state["tp_trackers"]):
        tracker.load_state_dict({key: _decode(value) for key, value in encoded.items()})


def pick_rng_state(saved: list[dict], grid: Grid) -> dict:
    """The saved rank at my coordinates (same layout: exact continuation); on another layout the
    rank at my coordinates modulo the saved sizes (dropout masks then differ from the old run)."""
    sizes = {axis: 1 + max(s["coord"][axis] for s in saved) for axis in ("tp", "pp", "dp")}
    mine = {"tp": 0, "pp": 0, "dp": 0} if grid is None else \
        {"tp": grid.tp_rank, "pp": grid.pp_rank, "dp": grid.dp_rank}
    wanted = {axis: mine[axis] % sizes[axis] for axis in sizes}
    for state in saved:
        if state["coord"] == wanted:
            return state
    return saved[0]
