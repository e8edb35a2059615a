"""ZeRO-3: parameters live as 1/dp shards and are gathered only around the layer that uses them.

Each ZeRO-3 bucket belongs to a module (a transformer layer, or a model chunk for its embeddings,
final norm and head). Module hooks materialise the bucket just in time (Rajbhandari et al. 2019,
section 5.3, "P_os+g+p"):

    forward   pre-hook: all-gather the layer's parameters -> run the layer -> hook: free them
    backward  the gradient arriving at the layer's output: all-gather them again -> the layer's
              backward -> once every parameter's gradient has been accumulated: free them

Prefetch (parallel.zero3_prefetch = k, default 1; 0 gathers synchronously). Waiting for a gather
just before the layer runs leaves the network idle during compute and the compute idle during
the gather. So when a unit starts, the gather of the unit expected next is launched
asynchronously (async_op=True), and its handle is waited only when that unit starts in turn:

    forward    chunk -> layer 0 -> layer 1 -> ... -> layer n-1     (the chunk's layers in order)
    backward   chunk -> layer n-1 -> ... -> layer 0                (the reverse)

    layer i starts:   wait for its own gather (launched while layer i-1 ran) ->
                      launch the gather of layer i+1 -> compute layer i -> free layer i

At most k prefetched units are in flight or held unclaimed; launching one more first waits for
the oldest and frees it. Each layer is freed before the next one starts, so the layers
materialised at once are the running one plus at most k (besides the chunk's unit). The guess is only a guess: under a pipeline schedule, or any code that runs
layers in another order, the unit prefetched may not be the one that runs next. That costs
memory and time, never correctness: a unit always waits for its own gather before use, whoever
launched it; freeing a unit waits for any collective still writing into it; and step() (via
`release_prefetched`) waits for and frees every unclaimed prefetch before the shards change.

Activation checkpointing runs a layer's forward again inside its backward, after the
output-gradient hook has gathered it. A forward pre-hook that fires while a unit is in backward
is such a recompute: it gathers synchronously (a no-op, the unit is there) and prefetches
nothing, so a recompute never disturbs the backward-order prefetch; its post-hook must not free
the unit, which backward still needs.

Freeing resizes the flat buffer's storage to zero and points each parameter at a NaN stand-in of
its shape (a view of the freed storage would read past its end); gathering points them back at
their slices. Autograd saves a weight as the parameter itself, so when backward runs it sees the
re-gathered values.

The chunk's own unit (embeddings, final norm, head) is gathered by the chunk's forward pre-hook
and freed only after the chunk's forward, so it stays materialised for the whole forward of the
chunk, and again from the loss's backward until its last gradient (the input embedding's)
arrives: its bytes add to the per-layer working set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanomt.parallel import comm
from nanomt.parallel.data_parallel.buckets import free_params, materialise_params


@dataclass(eq=False)  # units are compared by identity
class GatherUnit:
    """The ZeRO-3 buckets one module needs materialised to run: gathered together, freed
    together. `grads_seen` counts its parameters' gradients in the current backward; `handles`
    are its all-gathers still in flight; next_forward / next_backward the unit expected to run
    after it (None: no guess)."""

    module: nn.Module
    is_layer: bool
    buckets: list = field(default_factory=list)
    num_params: int = 0
    grads_seen: int = 0
    in_backward: bool = False
    handles: list = field(default_factory=list)
    next_forward: GatherUnit | None = None
    next_backward: GatherUnit | None = None

    @property
    def materialised(self) -> bool:
        return any(b.gathered for b in self.buckets)


@dataclass
class GatherStats:
    """What the gatherer did (tests and the benchmark read it)."""

    gathers: int = 0           # all-gathers issued over dp (synchronous and prefetched)
    prefetches: int = 0        # units whose gather was launched ahead of their use
    prefetch_hits: int = 0     # ... and then claimed by the unit's own forward or backward
    prefetch_misses: int = 0   # ... and freed unused (a wrong guess, or released by step())
    peak_layers: int = 0       # most transformer-layer units materialised at once


class ParameterGatherer:
    """Installs the hooks that gather each unit's parameters before its forward and backward and
    free them afterwards, prefetching `prefetch` units ahead (module docstring)."""

    def __init__(self, buffer, prefetch: int = 1):
        if prefetch < 0:
            raise ValueError(f"parallel.zero3_prefetch must be >= 0, got {prefetch}")
        self.dp_group, self.dp = buffer.dp_group, buffer.dp
        self.prefetch = prefetch
        self.units: dict[int, GatherUnit] = {}
        self.unit_of_param: dict[int, GatherUnit] = {}
        self.ahead: list[GatherUnit] = []  # prefetched, not yet claimed, oldest first
        self.units_in_backward = 0
        self.stats = GatherStats()
        chunk_ids = {id(chunk) for chunk in buffer.chunks}
        for bucket in buffer.buckets:
            unit = self.units.get(id(bucket.owner))
            if unit is None:
                unit = GatherUnit(bucket.owner, is_layer=id(bucket.owner) not in chunk_ids)
                self.units[id(bucket.owner)] = unit
            unit.buckets.append(bucket)
            unit.num_params += len(bucket.params)
            for param in bucket.params:
                self.unit_of_param[id(param)] = unit
        for chunk in buffer.chunks:
            self._link_execution_order(chunk)
        for unit in self.units.values():
            unit.module.register_forward_pre_hook(self._make_pre_hook(unit))
            unit.module.register_forward_hook(self._make_post_hook(unit))

    def _link_execution_order(self, chunk: nn.Module) -> None:
        """forward: chunk -> layer 0 -> ... -> layer n-1; backward: chunk -> layer n-1 -> ... 0."""
        layers = [self.units[id(m)] for m in getattr(chunk, "layers", []) if id(m) in self.units]
        chunk_unit = self.units.get(id(chunk))
        for earlier, later in zip(layers, layers[1:]):
            earlier.next_forward, later.next_backward = later, earlier
        if chunk_unit is not None and layers:
            chunk_unit.next_forward, chunk_unit.next_backward = layers[0], layers[-1]

    # ---- gather, wait, free ------------------------------------------------------------------
    @torch.no_grad()
    def _launch(self, unit: GatherUnit, async_op: bool) -> None:
        """Allocate the unit's flat buffers and start (or run) their all-gathers."""
        for b in unit.buckets:
            if b.gathered:
                continue
            materialise_params(b)
            if self.dp > 1:
                self.stats.gathers += 1
            handle = comm.all_gather_into(b.param_buffer, b.param_shard, self.dp_group,
                                          async_op=async_op)
            if handle is not None:
                unit.handles.append(handle)
        if unit.is_layer:
            live = sum(u.is_layer and u.materialised for u in self.units.values())
            self.stats.peak_layers = max(self.stats.peak_layers, live)

    def _wait(self, unit: GatherUnit) -> None:
        if unit.handles:
            comm.note_operation("wait for all_gather (ZeRO-3 parameters)", self.dp_group)
        for handle in unit.handles:
            handle.wait()
        unit.handles.clear()

    def gather(self, unit: GatherUnit) -> None:
        """Materialise the unit for use: claim its prefetch if there is one, wait for it."""
        if unit in self.ahead:
            self.ahead.remove(unit)
            self.stats.prefetch_hits += 1
        self._launch(unit, async_op=False)
        self._wait(unit)

    def free(self, unit: GatherUnit) -> None:
        if unit in self.ahead:  # prefetched and never used
            self.ahead.remove(unit)
            self.stats.prefetch_misses += 1
        self._wait(unit)  # never release storage a collective is still writing into
        for b in unit.buckets:
            free_params(b)

    def _prefetch(self, unit: GatherUnit | None) -> None:
        """Launch the gather of `unit`, the one expected next, keeping <= prefetch ahead."""
        if self.prefetch == 0 or unit is None or unit in self.ahead or unit.materialised:
            return
        while len(self.ahead) >= self.prefetch:
            self.free(self.ahead[0])
        self._launch(unit, async_op=True)
        self.ahead.append(unit)
        self.stats.prefetches += 1

    def release_prefetched(self) -> None:
        """Wait for and free every prefetched unit nobody claimed (before the shards change)."""
        while self.ahead:
            self.free(self.ahead[0])

    # ---- hooks -------------------------------------------------------------------------------
    def _set_in_backward(self, unit: GatherUnit, value: bool) -> None:
        if unit.in_backward != value:
            unit.in_backward = value
            self.units_in_backward += 1 if value else -1

    def _make_pre_hook(self, unit: GatherUnit):
        def pre_hook(module, args):
            recomputing = self.units_in_backward > 0  # a forward run again inside backward
            self.gather(unit)
            if not recomputing:
                self._prefetch(unit.next_forward)
        return pre_hook

    def _make_post_hook(self, unit: GatherUnit):
        def gather_for_backward(grad):
            self._set_in_backward(unit, True)
            self.gather(unit)
            self._prefetch(unit.next_backward)
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
            self._set_in_backward(unit, False)
            self.free(unit)

    def gather_all(self) -> None:
        """Materialise every parameter (for export or a checkpoint of the full weights)."""
        for unit in self.units.values():
            self.gather(unit)

    def free_all(self) -> None:
        for unit in self.units.values():
            self.free(unit)

    @property
    def gathers(self) -> int:
        return self.stats.gathers
