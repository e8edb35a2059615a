"""Memory accounting per rank: parameters, gradients, optimizer state and peak activations.

The model-state side is what the gradient buffer and the sharded optimizer report holding
(`optimizer.memory()`: the buffers this rank really holds), and is
compared with ZeRO's formulas (Rajbhandari et al. 2019, section 3.1): with Psi parameters, N_d
data-parallel ranks, p/g bytes per parameter and gradient element and K bytes of optimizer state
per parameter (the paper's mixed-precision Adam: p = g = 2, K = 12 -> 16 bytes/param; nanomt
keeps bf16/fp16 gradients in fp32 by default, g = 4),

    stage 0: params p Psi       grads g Psi       state K Psi
    stage 1: params p Psi       grads g Psi       state K Psi / N_d
    stage 2: params p Psi       grads g Psi / N_d state K Psi / N_d
    stage 3: params p Psi / N_d grads g Psi / N_d state K Psi / N_d

The gradient term holds at the step's peak, after backward and before the update (the
optimizer records `memory_after_backward` there), not only between steps when buffers are freed.

Activations are measured, not estimated: `PeakMemoryMeter` watches every tensor storage created
while it is active (forward and backward, including recomputation) and reports the peak of the
bytes still alive: saved activations, gradients being formed and temporaries, above what existed
before. It works on CPU, where torch keeps no allocator statistics. What it should find is
Korthikanti et al. 2022's activation formulas (`activation_bytes_per_layer`, at the end).
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from typing import TYPE_CHECKING

import torch
# torch 2.13 exports TorchDispatchMode under no public name: this is nanomt's one import of it
from torch.utils._python_dispatch import TorchDispatchMode

from nanomt.parallel import comm
from nanomt.parallel.data_parallel.buckets import RESIZE_STORAGE_BYTES

if TYPE_CHECKING:
    from nanomt.parallel.grid import ParallelGrid
    from nanomt.optim.sharded_adamw import ShardedAdamW


def zero_formula_bytes(num_params: int, dp: int, stage: int, param_bytes: int = 2,
                       grad_bytes: int = 4, state_bytes: int = 12) -> dict[str, float]:
    """ZeRO's per-rank bytes for `num_params` parameters at `stage` (module docstring)."""
    return {"params": param_bytes * num_params / (dp if stage >= 3 else 1),
            "grads": grad_bytes * num_params / (dp if stage >= 2 else 1),
            "optimizer_state": state_bytes * num_params / (dp if stage >= 1 else 1)}


class PeakMemoryMeter(TorchDispatchMode):
    """with PeakMemoryMeter() as meter: ...  ->  meter.peak_bytes (storages created inside).

    A storage counts from the op that creates it until it is freed, at its size after the last
    op that touched it (ZeRO-3 frees and re-allocates its gathered buffers in place through the
    dispatcher, buckets.resize_storage, so the meter sees each resize). Outputs on an input's
    storage (views, in-place results) are no new memory.

    The cost per op is the op's own tensors, not every live storage: torch keeps a storage's
    Python object alive exactly as long as the storage, so a weak reference to that object
    says when the storage is freed. Its callback only queues the storage (frees can happen on
    another thread: gloo's workers drop a collective's buffers), and the next op, or
    bytes_now(), takes its bytes off."""

    def __init__(self, import_now: bool = False):
        """import_now: pay here, not inside the first measured op, the import of torch's
        compiler stack that the first op under any dispatch mode triggers (~1.5 s on 2 CPU
        cores; torch wraps every __torch_dispatch__ in torch._dynamo.disable)."""
        super().__init__()
        if import_now:
            # that stack's module: torch.compiler, its public face, imports it only when used
            import torch._dynamo  # noqa: F401
        self.live: dict[int, list] = {}  # storage identity -> [weak reference, counted bytes]
        self.freed: collections.deque = collections.deque()  # (identity, weak reference)
        self.current_bytes = 0
        self.peak_bytes = 0

    def watch(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """`with meter.watch(cond):` measures only when cond holds."""
        return self if enabled else contextlib.nullcontext()

    def bytes_now(self) -> int:
        """The bytes of the storages created inside that are still alive now."""
        self._forget_freed()
        return self.current_bytes

    def __exit__(self, *exc_info):
        self._forget_freed()  # current_bytes on leaving: what is still alive then
        return super().__exit__(*exc_info)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._forget_freed()  # first: a freed storage's identity may be reused by an output
        held = set()  # e.g. weight.t() of a weight that existed before the meter started
        # only an op that writes to an input can resize it (torch's resize_storage_bytes_
        # carries no write annotation)
        resizes = func._schema.is_mutable or func is RESIZE_STORAGE_BYTES
        for storage in _storages(args, _storages(kwargs) if kwargs else []):
            held.add(storage._cdata)
            if resizes:
                self._recount(storage)
        for storage in _storages(out):
            if storage._cdata not in held and not self._recount(storage):
                self._track(storage)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, queue = storage._cdata, self.freed
        ref = weakref.ref(storage, lambda ref: queue.append((key, ref)))
        self.live[key] = [ref, storage.nbytes()]
        self.current_bytes += storage.nbytes()

    def _recount(self, storage: torch.UntypedStorage) -> bool:
        """Count a watched storage at its size now; False if it is not watched."""
        entry = self.live.get(storage._cdata)
        if entry is None:
            return False
        self.current_bytes += storage.nbytes() - entry[1]
        entry[1] = storage.nbytes()
        return True

    def _forget_freed(self) -> None:
        while self.freed:
            key, ref = self.freed.popleft()
            entry = self.live.get(key)
            if entry is not None and entry[0] is ref:  # not a newer storage at the same address
                del self.live[key]
                self.current_bytes -= entry[1]


def _storages(value, found: list | None = None) -> list[torch.UntypedStorage]:
    """The storages behind the tensors in an op's arguments or results, which hold tensors
    directly or in lists, tuples and dicts (none for meta tensors). torch's tree_flatten does
    the same for any container, at several times the cost per op."""
    found = [] if found is None else found
    for item in (value.values() if isinstance(value, dict)
                 else value if isinstance(value, (list, tuple)) else (value,)):
        if isinstance(item, torch.Tensor):
            if item.device.type != "meta":
                found.append(item.untyped_storage())
        elif isinstance(item, (list, tuple, dict)):
            _storages(item, found)
    return found


def memory_report(optimizer: ShardedAdamW, peak_activation_bytes: int | None,
                  grid: ParallelGrid | None, peak_process_bytes: int | None = None) -> list[dict]:
    """Every rank's accounting, gathered onto every rank (rank order): model-state bytes now
    (between steps) and at the step's peak (`after_backward`: the last step's gradients
    complete, before the update; `grads_peak_in_backward`: the most gradient bytes held at once
    during that backward, in-flight full buckets included; `peak_process_bytes`: the most the
    process held, nanomt.metrics.peak_memory_bytes)."""
    after_backward = optimizer.memory_after_backward
    mine = {"rank": grid.rank if grid is not None else 0, **optimizer.memory(),
            "peak_activations": peak_activation_bytes, "peak_process": peak_process_bytes,
            "after_backward": after_backward,  # the model-state peak: gradients complete
            "peak_model_state": sum(after_backward.get(k, 0)
                                    for k in ("params", "grads", "optimizer_state"))}
    if grid is None or not grid.is_distributed:
        return [mine]
    return comm.all_gather_object(mine)


__all__ = ["PeakMemoryMeter", "memory_report", "zero_formula_bytes"]


# ---- activation formulas: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
# Transformer Models", sections 4 and 5 (table 2) --------------------------------------------------
RECOMPUTE_MODES = ("none", "selective", "full")


def _layer_terms(s: int, b: int, h: int, a: int, f: int, e: float, m: float, dropout: bool,
                 flash: bool, llama: bool) -> list[tuple[str, float, str]]:
    """(what is kept, bytes at tp=1, where it lives) for one layer; `where` is "whole" (the
    hidden state between the tensor-parallel regions), "split" (inside them: heads or ffn
    columns) or "core" (the attention core: what selective recompute drops)."""
    sbh = s * b * h
    norm1 = [("norm1 input", e * sbh, "whole")]
    if llama:
        norm1.append(("norm1 normalized input", e * sbh, "whole"))
    terms = norm1 + [("qkv input", e * sbh, "whole"),
                     ("q and k", 2 * e * sbh, "split"),
                     ("v", e * sbh, "split")]
    if llama:
        terms.append(("rotated q and k", 2 * e * sbh, "split"))
    if flash:
        terms.append(("softmax statistics", 4 * a * s * b, "core"))  # fp32 log-sum-exp per row
        if llama:
            terms.append(("attention output", e * sbh, "core"))
    else:
        terms.append(("softmax output", e * a * s * s * b, "core"))
        if dropout:
            terms += [("attention dropout mask", m * a * s * s * b, "core"),
                      ("attention dropout output", e * a * s * s * b, "core")]
    terms += [("projection input", e * sbh, "split"),
              ("norm2 input", e * sbh, "whole")]
    if llama:
        terms += [("norm2 normalized input", e * sbh, "whole"),
                  ("fc1 input", e * sbh, "whole"),
                  ("gate and up", 2 * e * s * b * f, "split"),
                  ("silu output", e * s * b * f, "split"),
                  ("fc2 input", e * s * b * f, "split")]
    else:
        terms += [("fc1 input", e * sbh, "whole"),
                  ("gelu input", e * s * b * f, "split"),
                  ("fc2 input", e * s * b * f, "split")]
    if dropout:
        terms += [("attention residual dropout mask", m * sbh, "whole"),
                  ("mlp residual dropout mask", m * sbh, "whole")]
    return terms


def activation_terms(seq_len: int, micro_batch: int, hidden: int, heads: int, tp: int = 1,
                     sequence_parallel: bool = False, recompute: str = "none",
                     dropout: bool = True, flash: bool = False, bytes_per_element: float = 2,
                     mask_bytes: float = 1, ffn_hidden: int | None = None,
                     style: str = "gpt") -> dict[str, float]:
    """Bytes one transformer layer keeps for its backward on one rank, term by term.

    s = seq_len, b = micro_batch, h = hidden, a = heads, t = tp, e = bytes_per_element (2 for
    bf16/fp16, 4 for fp32), m = mask_bytes (a dropout mask element), f = ffn_hidden (4h);
    style="gpt" (GPT-3's layer, the paper's):

        attention    norm1 input                    e s b h      LayerNorm keeps its input
                     qkv input (norm1 output)       e s b h      a matmul keeps its input
                     q and k                        2 e s b h    Q K^T keeps both operands
                     softmax output                 e a s^2 b    softmax backward needs it
                     attention dropout mask         m a s^2 b    (dropout)
                     attention dropout output       e a s^2 b    (dropout; else the softmax
                                                                 output is what meets V)
                     v                              e s b h
                     projection input               e s b h
                     residual dropout mask          m s b h      (dropout)
        MLP          norm2 input, fc1 input         2 e s b h
                     gelu input (fc1 output)        e s b f
                     fc2 input (gelu output)        e s b f
                     residual dropout mask          m s b h      (dropout)

    Tensor parallelism divides by t what lies inside its regions (q, k, v, the a s^2 terms,
    the projection and fc2 inputs, the gelu input); the norms' and the column-parallel linears'
    inputs and the residual dropout masks stay whole on every rank. Sequence parallelism splits
    those along the sequence: every term / t. `flash`: no s^2 matrix is kept, only the fp32
    log-sum-exp per row and head, 4 a s b (the masks are regenerated from the RNG state).
    `recompute`: "selective" recomputes the attention core (drops its s^2 or flash terms);
    "full" keeps only the layer's input, e s b h (/ t under sequence parallelism).

    At e = 2, m = 1, f = 4h with dropout the terms add up to the paper's per-layer bytes:
        no parallelism   s b h (34 + 5 a s / h)
        tensor parallel  s b h (10 + 24 / t + 5 a s / (h t))
        tp + sequence    s b h (34 + 5 a s / h) / t
        + selective      s b h (10 + 24 / t), or 34 s b h / t with sequence parallelism
        full recompute   2 s b h, or 2 s b h / t with sequence parallelism

    style="llama" (RMSNorm, RoPE, SwiGLU; f is the config's, 8h/3 rounded by default) keeps
    besides (gelu's two terms replaced) what the meter finds torch's kernels keep:

        attention    norm1 normalized input         e s b h      RMSNorm keeps x and x rstd
                     rotated q and k                2 e s b h    beside the unrotated q, k
                     attention output (flash)       e s b h      beside the projection input
        MLP          norm2 normalized input         e s b h
                     gate and up (fc1 output)       2 e s b f    silu and the product keep them
                     silu output                    e s b f
                     fc2 input (silu(gate) * up)    e s b f

    The attention kernel's output follows q's layout: llama's rotated q is contiguous
    [b, a, s, d], so the projection's [s, b, h] input is a copy (gpt's q, a view of qkv in
    [s, b] order, gives an output the projection reads in place). The rotated q and k and the
    MLP's terms are split over tp, the normalized inputs whole, the attention output is the
    core's (selective drops it). At e = 2, no dropout, flash:
        no parallelism   s b h (26 + 8 f / h) + 4 a s b        (f = 4h: 58 s b h, gpt's 32)
        tensor parallel  s b h (12 + (14 + 8 f / h) / t) + 4 a s b / t
        tp + sequence    (s b h (26 + 8 f / h) + 4 a s b) / t
        + selective      s b h (12 + (12 + 8 f / h) / t), or s b h (24 + 8 f / h) / t with SP
        full recompute   as gpt's
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if style not in ("gpt", "llama"):
        raise ValueError(f"style must be gpt or llama, got {style!r}")
    s, b, h, a, t = seq_len, micro_batch, hidden, heads, tp
    whole_divisor = t if sequence_parallel else 1
    if recompute == "full":
        return {"layer input": bytes_per_element * s * b * h / whole_divisor}
    terms = _layer_terms(s, b, h, a, ffn_hidden or 4 * h, bytes_per_element, mask_bytes,
                         dropout, flash, style == "llama")
    return {name: value / (whole_divisor if where == "whole" else t)
            for name, value, where in terms if not (recompute == "selective" and where == "core")}


def activation_bytes_per_layer(seq_len: int, micro_batch: int, hidden: int, heads: int,
                               tp: int = 1, sequence_parallel: bool = False,
                               recompute: str = "none", dropout: bool = True, flash: bool = False,
                               bytes_per_element: float = 2, mask_bytes: float = 1,
                               ffn_hidden: int | None = None, style: str = "gpt") -> float:
    """The sum of `activation_terms`: bytes one layer keeps for backward on one rank."""
    return sum(activation_terms(seq_len, micro_batch, hidden, heads, tp, sequence_parallel,
                                recompute, dropout, flash, bytes_per_element, mask_bytes,
                                ffn_hidden, style).values())


__all__ += ["RECOMPUTE_MODES", "activation_bytes_per_layer", "activation_terms"]
