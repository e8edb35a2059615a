"""Deferred initialisation: build the model on the meta device, materialise each tensor later,
directly where it lives and in its final dtype.

Building a model the usual way draws every weight in fp32 before anything is sharded: a rank
holds its whole tp/pp-local model in fp32 (and mixed precision then keeps an fp32 copy for the
masters), far more than its steady state under ZeRO-3. Instead, the model is built under
`torch.device("meta")`: every parameter is only a shape and dtype, and the module that declares
it records, in `module.initializers[name]`, a function drawing its fp32 values on the CPU (the
same layout-independent blockwise draws as an eager build: nanomt.parallel.blockwise_init.
NormalInit). `place_on` gives each parameter a one-element stand-in on its device; whoever lays
the parameters out then calls `InitialValues(chunks)(param)` for one tensor
at a time: the gradient buffer writes it into its flat bucket (under ZeRO-3 the bucket is one
layer and only its shard stays), the sharded optimizer copies its fp32 master shard from it.
So start-up holds at most the steady state plus one layer, and the weights are bit for bit
those of an eager build with the same seed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nanomt.parallel.param_info import param_info, set_param_info

MakeValues = Callable[[], torch.Tensor]  # () -> the fp32 values of one local tensor, on the CPU


def building_on_meta() -> bool:
    """True inside `with torch.device("meta"):` (the model is being built without memory)."""
    return torch.get_default_device().type == "meta"


def new_parameter(make: MakeValues, shape: tuple[int, ...]) -> nn.Parameter:
    """A Parameter holding make()'s values; on the meta device (building_on_meta) only its shape,
    make() runs when the parameter is laid out."""
    if building_on_meta():
        return nn.Parameter(torch.empty(shape))
    return nn.Parameter(make())


class InitialValues:
    """The fp32 starting values of every parameter of `chunks`, drawn when asked for.

    Modules declare `initializers` {parameter name: MakeValues}; every parameter must have one.
    Also a mapping id(param) -> values (`get`), the shape the optimizer's master weights read."""

    def __init__(self, chunks: list[nn.Module]):
        self.makers: dict[int, MakeValues] = {}
        for chunk in chunks:
            for module in chunk.modules():
                own = dict(module.named_parameters(recurse=False))
                for name, make in getattr(module, "initializers", {}).items():
                    if name in own:
                        self.makers[id(own[name])] = make
        missing = [name for chunk in chunks for name, p in chunk.named_parameters()
                   if id(p) not in self.makers]
        if missing:
            raise ValueError(f"no initializer for {missing[:3]}: every module that builds "
                             f"parameters declares `initializers`")

    def __call__(self, param: nn.Parameter) -> torch.Tensor:
        return self.makers[id(param)]()

    def get(self, key: int, default: torch.Tensor) -> torch.Tensor:
        return self.makers[key]() if key in self.makers else default

    def __len__(self) -> int:
        return len(self.makers)


def is_on_meta(chunks: list[nn.Module]) -> bool:
    return any(p.is_meta for chunk in chunks for p in chunk.parameters())


def place_on(chunks: list[nn.Module], device: torch.device | str) -> None:
    """Replace each meta parameter by a stand-in of its shape and dtype on `device` that holds one
    element (a 0-d tensor expanded; a meta Parameter cannot be pointed at real memory), keeping
    its ParamInfo; the gradient buffer then points it at its bucket. Buffers move to `device`."""
    for chunk in chunks:
        for module in chunk.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.is_meta:
                    continue
                stand_in = torch.empty((), dtype=param.dtype, device=device).expand(param.shape)
                new = nn.Parameter(stand_in, requires_grad=param.requires_grad)
                set_param_info(new, param_info(param))
                setattr(module, name, new)  # replaces the registered parameter
    move_buffers(chunks, device)


def move_buffers(chunks: list[nn.Module], device: torch.device | str) -> None:
    """Move the (non-parameter) buffers, built for real on the CPU, to `device`."""
    for chunk in chunks:
        for module in chunk.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, name, buffer.to(device))  # stays a (non-)persistent buffer
