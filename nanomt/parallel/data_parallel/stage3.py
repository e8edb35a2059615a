"""ZeRO-3: parameters live as 1/dp shards, gathered only around the module that uses them.

Each bucket belongs to a unit (a transformer layer, or a chunk for its embeddings, final norm
and head), materialised just in time by module hooks (Rajbhandari et al. 2019, section 5.3):

    forward   pre-hook: all-gather the unit's parameters -> run the module -> hook: free them
    backward  gradient at the module's output: all-gather again -> the module's backward ->
              every parameter's gradient accumulated: free them

A forward inside a backward pass is an activation-checkpointing recompute: it must not free; a
unit is freed once every backward begun has all its gradients (zero-bubble's W come later).
Freeing points each parameter at a NaN stand-in (a stray read shows NaN, not freed memory);
autograd saved the parameter itself, so backward sees the re-gathered values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from nanomt.parallel import comm
from nanomt.parallel.data_parallel.buckets import Bucket, resize_storage, split_experts


def plan_by_layer(chunks: list[nn.Module], names: dict[int, str],
                  separate: list[nn.Parameter]) -> list[tuple[list, nn.Module]]:
    """One bucket per transformer layer (experts' weights in a second), in backward order,
    and for the rest of each chunk two:
    the parameters registered after the layers (their gradients arrive first in backward) and
    those before them (they arrive last), so neither waits through the whole backward."""
    alone = {id(p) for p in separate}
    plans: list[tuple[list, nn.Module]] = []
    for chunk in reversed(chunks):
        layers = list(getattr(chunk, "layers", []))
        in_layers = set()
        for layer in reversed(layers):
            params = [(names[id(p)], p) for p in layer.parameters() if p.requires_grad]
            in_layers.update(id(p) for _, p in params)
            plans += [(group, layer) for group in split_experts(params)]
        before_layers, after_layers, seen_layer = [], [], False
        for param in chunk.parameters():
            if id(param) in in_layers:
                seen_layer = True
            elif param.requires_grad and id(param) not in alone:
                (after_layers if seen_layer else before_layers).append((names[id(param)], param))
        shared = [(names[id(p)], p) for p in chunk.parameters()
                  if p.requires_grad and id(p) in alone]
        for group in [after_layers, before_layers] + [[item] for item in shared]:
            if group:
                plans.append((group, chunk))
    return plans


def free_params(b: Bucket) -> None:
    """Release the flat buffer's memory; point each parameter at a NaN stand-in of its shape."""
    resize_storage(b.param_buffer, 0)
    if b.freed_stand_in is None:  # one per bucket, made at the first free
        b.freed_stand_in = torch.full((), float("nan"), dtype=b.dtype,
                                      device=b.param_buffer.device)
    for param in b.params:
        param.data = b.freed_stand_in.expand(param.shape)
    b.gathered = False


def materialise_params(b: Bucket) -> None:
    """Give the flat buffer its memory back and point each parameter at its slice (the caller's
    all-gather fills them)."""
    resize_storage(b.param_buffer, b.padded_numel * b.param_buffer.element_size())
    for param, offset in zip(b.params, b.offsets):
        param.data = b.param_buffer[offset: offset + param.numel()].view(param.shape)
    b.gathered = True


@dataclass(eq=False)  # units are compared by identity
class GatherUnit:
    """The buckets one module needs materialised to run, and its all-gathers in flight."""

    module: nn.Module
    is_layer: bool
    buckets: list[Bucket] = field(default_factory=list)
    num_params: int = 0
    grads_seen: int = 0        # its parameters' gradients in the backwards begun
    backwards: int = 0         # backwards begun and not complete (> 1: zero-bubble's W later)
    works: list = field(default_factory=list)

    @property
    def materialised(self) -> bool:
        return any(b.gathered for b in self.buckets)


def running_backward() -> bool:
    """Whether autograd's engine is running a backward now: a forward there is a recompute."""
    # torch._C: no public API says so; torch.utils.checkpoint asks the engine the same way
    return torch._C._current_graph_task_id() != -1


class ParameterGatherer:
    """The hooks that gather each unit before its forward and backward and free it after."""

    def __init__(self, chunks: list[nn.Module], buckets: list[Bucket]):
        self.units: dict[int, GatherUnit] = {}
        chunk_ids = {id(chunk) for chunk in chunks}
        for bucket in buckets:
            unit = self.units.setdefault(id(bucket.owner), GatherUnit(
                bucket.owner, is_layer=id(bucket.owner) not in chunk_ids))
            unit.buckets.append(bucket)
            unit.num_params += len(bucket.params)
            for param in bucket.params:  # after the buffer's own hook (registered first)
                param.register_post_accumulate_grad_hook(partial(self._param_grad_hook, unit))
        for unit in self.units.values():
            unit.module.register_forward_pre_hook(partial(self._pre_hook, unit))
            unit.module.register_forward_hook(partial(self._post_hook, unit))

    # ---- gather, wait, free ------------------------------------------------------------------
    @torch.no_grad()
    def _launch(self, unit: GatherUnit, async_op: bool = False) -> None:
        """Allocate the unit's flat buffers and start (or run) their all-gathers."""
        for b in unit.buckets:
            if b.gathered:
                continue
            materialise_params(b)
            work = comm.all_gather_into(b.param_buffer, b.param_shard, b.group,
                                        async_op=async_op)
            if work is not None:
                unit.works.append(work)

    def _wait(self, unit: GatherUnit) -> None:
        if unit.works:
            comm.note_operation("wait for all_gather (ZeRO-3 parameters)",
                                unit.buckets[0].group)
        for work in unit.works:
            work.wait()
        unit.works.clear()

    def gather(self, unit: GatherUnit) -> None:
        """Materialise the unit for use and wait until its values are there."""
        self._launch(unit)
        self._wait(unit)

    def free(self, unit: GatherUnit) -> None:
        self._wait(unit)  # never release storage a collective is still writing into
        for b in unit.buckets:
            free_params(b)

    def release_prefetched(self) -> None:
        """Nothing is gathered ahead here (zero3_prefetch.py)."""

    # ---- hooks -------------------------------------------------------------------------------
    def _pre_hook(self, unit: GatherUnit, module, args) -> None:
        self.gather(unit)

    def _post_hook(self, unit: GatherUnit, module, args, output) -> None:
        if running_backward():  # a recompute, which must not free: backward needs the weights
            return
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        began = [False]  # this forward's backward begins at its outputs' first gradient
        for tensor in outputs:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(partial(self._output_grad_hook, unit, began))
        self.free(unit)

    def _output_grad_hook(self, unit: GatherUnit, began: list, grad: torch.Tensor) -> torch.Tensor:
        if not began[0]:
            began[0], unit.backwards = True, unit.backwards + 1
        self.gather(unit)
        return grad

    @torch.no_grad()
    def _param_grad_hook(self, unit: GatherUnit, param: nn.Parameter) -> None:
        """A parameter's gradient is accumulated: free its unit once all (of every backward) are."""
        unit.grads_seen += 1
        if unit.grads_seen == unit.num_params * max(unit.backwards, 1):
            unit.grads_seen = unit.backwards = 0
            self.free(unit)

    def gather_all(self) -> None:
        """Materialise every parameter (to export the full weights)."""
        for unit in self.units.values():
            self.gather(unit)

    def free_all(self) -> None:
        for unit in self.units.values():
            self.free(unit)
