"""ZeRO-3: parameters live as 1/dp shards and are gathered only around the layer that uses them.

Each ZeRO-3 bucket belongs to a module (a transformer layer, or a model chunk for its embeddings,
final norm and head). Module hooks materialise the bucket just in time (Rajbhandari et al. 2019,
section 5.3, "P_os+g+p"):

    forward   pre-hook: all-gather the layer's parameters -> run the layer -> hook: free them
    backward  the gradient arriving at the layer's output: all-gather them again -> the layer's
              backward -> once every parameter's gradient has been accumulated: free them

Freeing resizes the flat buffer's storage to zero; the parameters stay views of it, so autograd's
saved references to a weight see the re-gathered values when backward runs. A recompute under
activation checkpointing runs inside backward, after the output-gradient hook has gathered the
layer, and must not free it: `in_backward` marks that window.

Cost, as written (simple, not fast): each gather is synchronous, with no prefetch of the next
layer, so the all-gather latency is not hidden behind compute (DeepSpeed prefetches the next
modules in the recorded execution order). The chunk's own unit (embeddings, final norm, head) is
gathered by the chunk's forward pre-hook and freed only after the chunk's forward, so it stays
materialised for the whole forward of the chunk, and again from the loss's backward until its
last gradient (the input embedding's) arrives: its bytes add to the per-layer working set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanomt.parallel import comm


@dataclass
class GatherUnit:
    """The ZeRO-3 buckets one module needs materialised to run: gathered together, freed
    together. `grads_seen` counts its parameters' gradients in the current backward."""

    module: nn.Module
    buckets: list = field(default_factory=list)
    num_params: int = 0
    grads_seen: int = 0
    in_backward: bool = False


class ParameterGatherer:
    """Installs the hooks that gather each unit's parameters before its forward and backward and
    free them afterwards (module docstring); counts the all-gathers it issues."""

    def __init__(self, optimizer):
        self.dp_group, self.dp = optimizer.dp_group, optimizer.dp
        self.units: dict[int, GatherUnit] = {}
        self.unit_of_param: dict[int, GatherUnit] = {}
        self.gathers = 0  # all-gathers issued (tests count them)
        for bucket in optimizer.buckets:
            unit = self.units.setdefault(id(bucket.owner), GatherUnit(bucket.owner))
            unit.buckets.append(bucket)
            unit.num_params += len(bucket.params)
            for param in bucket.params:
                self.unit_of_param[id(param)] = unit
        for unit in self.units.values():
            unit.module.register_forward_pre_hook(self._make_pre_hook(unit))
            unit.module.register_forward_hook(self._make_post_hook(unit))

    @torch.no_grad()
    def gather(self, unit: GatherUnit) -> None:
        for b in unit.buckets:
            if b.gathered:
                continue
            b.param_buffer.untyped_storage().resize_(b.padded_numel * b.param_buffer.element_size())
            if self.dp > 1:
                self.gathers += 1
            comm.all_gather_into(b.param_buffer, b.param_shard, self.dp_group)
            b.gathered = True

    def free(self, unit: GatherUnit) -> None:
        for b in unit.buckets:
            b.param_buffer.untyped_storage().resize_(0)
            b.gathered = False

    def _make_pre_hook(self, unit: GatherUnit):
        def pre_hook(module, args):
            self.gather(unit)
        return pre_hook

    def _make_post_hook(self, unit: GatherUnit):
        def gather_for_backward(grad):
            unit.in_backward = True
            self.gather(unit)
            return grad

        def post_hook(module, args, output):
            if unit.in_backward:
                return  # a recompute during backward: backward still needs the weights
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            for tensor in outputs:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(gather_for_backward)
            self.free(unit)
        return post_hook

    def on_grad_ready(self, param: nn.Parameter) -> None:
        """Called after a parameter's gradient was accumulated: free the unit once all are."""
        unit = self.unit_of_param[id(param)]
        unit.grads_seen += 1
        if unit.grads_seen == unit.num_params:
            unit.grads_seen = 0
            unit.in_backward = False
            self.free(unit)

    def gather_all(self) -> None:
        """Materialise every parameter (for export or a checkpoint of the full weights)."""
        for unit in self.units.values():
            self.gather(unit)

    def free_all(self) -> None:
        for unit in self.units.values():
            self.free(unit)
