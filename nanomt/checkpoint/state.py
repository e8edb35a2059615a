"""What a rank contributes to a checkpoint, and how it takes its share back.

Every local tensor is a layout-independent piece of a tensor of the single-process model, and
its ParamInfo (nanomt.parallel.param_info, made when the model is built) says which: the name,
the global shape, the 1/t slice along tp_split_dim this tp rank holds, and for experts' weights
the 1/ep of the experts (dim 0) this ep rank holds. Pieces are written straight from it; nothing
here knows the model's names.

Model weights: every tensor by dp (and cp) rank 0 only (the other replicas hold the same
values), experts' weights by the first rank of expert_dp_group (one per ep rank); a replicated
tensor by tp rank 0 only; a tied copy that is not `primary` not at all.

Optimizer state: ShardedAdamW's flat shards (nanomt/optim/sharded_adamw.py):
`checkpoint_state()` -> (param, state_name, tensor, flat_range), flat_range being [a, b) of the
parameter's flattened local (tp-shard) tensor held by this dp rank, and
`load_checkpoint_state(read)` with read(param, state_name, flat_range) -> tensor. Every dp rank
writes its own range (at stage 0, where each holds everything, the rank that writes the
weights). Its scalars (Adam step, loss scale) go to meta.json via `scalar_state()`. Under ZeRO-3
the weights too are written as flat pieces of each dp rank's shard and read back into it.

RNG: Python's, torch's CPU (and CUDA) generators and each chunk's tensor-parallel tracker.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.param_info import ParamInfo, param_info

from nanomt.checkpoint.format import CheckpointError, Piece, make_piece, section_key

if TYPE_CHECKING:
    from nanomt.optim.sharded_adamw import ShardedAdamW

MODEL_SECTION = "model"

Grid = Optional[ParallelGrid]  # None: a single process
Optimizer = Optional["ShardedAdamW"]  # None: weights only (an imported or exported model)
# A nanomt.checkpoint.load.CheckpointReader (not imported here: load imports this module).
Reader = Any


def weight_shards(optimizer: Optimizer
                  ) -> list[tuple[nn.Parameter, torch.Tensor, tuple[int, int]]] | None:
    """ZeRO-3's weights as this dp rank holds them: (param, its shard view, (lo, hi)) with
    elements [lo, hi) of the flattened (tp-local) parameter; None when weights are whole.

    Saving writes these flat pieces from every dp rank and loading fills them in place, so no
    rank ever gathers the model."""
    if optimizer is not None:
        optimizer.buffer.wait_for_params()  # ZeRO-1/2 gathers a step may have left in flight
    if optimizer is None or optimizer.stage != 3:
        return None
    return optimizer.parameter_shards()


def optimizer_section(state_name: str) -> str:
    return f"optimizer/{state_name}"


def writes_replicas(grid: Grid, info: ParamInfo) -> bool:
    """Whether this rank writes a value its dp x cp replicas hold too: the first of them (j =
    dp_rank * cp + cp_rank = 0), for experts' weights the first of each ep rank's (j < ep)."""
    if grid is None:
        return True
    return grid.dp_rank * grid.cp_size + grid.cp_rank < (grid.ep_size if info.expert else 1)


def _tp_rank(grid: Grid) -> int:
    return 0 if grid is None else grid.tp_rank


def _box(param: nn.Parameter, grid: Grid) -> list[list[int]]:
    """The region of the global tensor this rank's `param` covers (its tp and ep slices)."""
    ep_rank = 0 if grid is None else grid.ep_rank
    return param_info(param).box(tuple(param.shape), _tp_rank(grid), ep_rank)


def _piece(section: str, param: nn.Parameter, tensor: torch.Tensor, grid: Grid,
           flat: list[int] | None = None) -> tuple[Piece, torch.Tensor] | None:
    """The piece `tensor` is (the param itself, or a flat range of it) of its global tensor."""
    info = param_info(param)
    box = _box(param, grid)
    return make_piece(section_key(section, info.name), info.name, tensor,
                      list(info.global_shape), box, flat)


def _stores(info: ParamInfo, grid: Grid) -> bool:
    """Only one copy of every value: tp rank 0 for replicated tensors, primary copies only."""
    return info.primary and (info.tp_split_dim is not None or _tp_rank(grid) == 0)


def _parameters(chunks: list[nn.Module]) -> Iterator[nn.Parameter]:
    return (param for chunk in chunks for param in chunk.parameters())


def model_pieces(chunks: list[nn.Module], optimizer: Optimizer,
                 grid: Grid) -> Iterator[tuple[Piece, torch.Tensor]]:
    """This rank's pieces of the weights, as views of the live tensors (copied when written)."""
    shards = weight_shards(optimizer)
    if shards is not None:  # ZeRO-3: every dp rank writes its own flat range of each weight
        values = [(param, shard, list(flat)) for param, shard, flat in shards]
    else:
        values = [(param, param.detach(), None) for param in _parameters(chunks)
                  if writes_replicas(grid, param_info(param))]
    for param, value, flat in values:
        if _stores(param_info(param), grid):
            piece = _piece(MODEL_SECTION, param, value, grid, flat)
            if piece is not None:
                yield piece


def optimizer_pieces(optimizer: Optimizer, grid: Grid) -> Iterator[tuple[Piece, torch.Tensor]]:
    """This rank's pieces of the optimizer state (its flat shards), views of the live state."""
    for param, state_name, tensor, flat in optimizer.checkpoint_state():
        if optimizer.stage == 0 and not writes_replicas(grid, param_info(param)):
            continue  # ZeRO stage 0: every replica holds the whole state
        if _stores(param_info(param), grid):
            piece = _piece(optimizer_section(state_name), param, tensor, grid, list(flat))
            if piece is not None:
                yield piece


def tensor_record(info: ParamInfo) -> dict:
    """What meta.json says of a stored tensor: the layout-independent part of its ParamInfo
    ("expert" only for experts' weights: dense checkpoints read as before)."""
    return {"global_shape": list(info.global_shape), "tp_split_dim": info.tp_split_dim,
            "tied_group": info.tied_group, **({"expert": True} if info.expert else {})}


def stored_records(chunks: list[nn.Module]) -> dict[str, dict]:
    """name -> record of every tensor this rank's chunks hold a stored copy of."""
    infos = [param_info(param) for param in _parameters(chunks)]
    return {info.name: tensor_record(info) for info in infos if info.primary}


def check_records(saved: dict[str, dict], chunks: list[nn.Module], where: str) -> None:
    """Refuse a checkpoint whose tensors are not the ones this model's parameters are."""
    for param in _parameters(chunks):
        info = param_info(param)
        record = saved.get(info.name)
        if record != tensor_record(info):
            raise CheckpointError(
                f"checkpoint {where} stores {info.name} as {record}, but this model's is "
                f"{tensor_record(info)}: change the model config to match, or pass another "
                f"checkpoint in train.resume")


# ---- loading ----------------------------------------------------------------------------------
def weight_key(reader: Reader, name: str) -> str:
    """The most exact copy of a weight: the fp32 master of a bf16/fp16 run, if saved."""
    master = section_key(optimizer_section("master"), name)
    return master if reader.has(master) else section_key(MODEL_SECTION, name)


@torch.no_grad()
def load_model(chunks: list[nn.Module], optimizer: Optimizer, reader: Reader,
               grid: Grid) -> None:
    """Copy this rank's slice of every parameter (under ZeRO-3: of its shard) out of the
    checkpoint."""
    shards = weight_shards(optimizer)
    if shards is not None:
        for param, shard, flat in shards:
            key = weight_key(reader, param_info(param).name)
            shard.copy_(reader.read(key, _box(param, grid), list(flat)))
        return
    for param in _parameters(chunks):
        value = reader.read(weight_key(reader, param_info(param).name), _box(param, grid), None)
        param.copy_(value.view(param.shape))


def load_optimizer(optimizer: ShardedAdamW, reader: Reader, grid: Grid) -> None:
    """Rebuild this rank's optimizer state from the checkpoint's full tensors."""
    def read(param: nn.Parameter, state_name: str, flat: tuple[int, int]) -> torch.Tensor:
        key = section_key(optimizer_section(state_name), param_info(param).name)
        return reader.read(key, _box(param, grid), list(flat))

    optimizer.load_checkpoint_state(read)


def reset_optimizer_state(optimizer: ShardedAdamW) -> None:
    """A checkpoint without optimizer state (an imported model): fresh moments for the loaded
    weights (the masters are copied from the new weights)."""
    def fresh(param: nn.Parameter, state_name: str, flat: tuple[int, int]) -> torch.Tensor:
        if state_name == "master":
            raise KeyError(state_name)  # taken from the loaded weights
        return torch.zeros(flat[1] - flat[0])

    optimizer.load_checkpoint_state(fresh)


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
        # the GPU's stream only once CUDA is in use: a CPU run on a GPU host never touches it
        "cuda": _encode(torch.cuda.get_rng_state()) if torch.cuda.is_initialized() else None,
        "tp_trackers": [{key: _encode(value) for key, value in chunk.rng.state_dict().items()}
                        for chunk in chunks if hasattr(chunk, "rng")],
    }


def restore_rng(state: dict, chunks: list[nn.Module]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(_decode(state["torch_cpu"]))
    if state.get("cuda") is not None and torch.cuda.is_initialized():
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
