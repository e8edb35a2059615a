"""Deferred weight gradients: a linear's backward split into B and W (Qi et al. 2024).

For Y = X W^T (+ b), backward computes two things from the output gradient dY:

    B   dX = dY W        what the previous layer (and pipeline stage) waits for
    W   dW = dY^T X      what only the optimizer needs

Under the zero-bubble schedules (parallel.schedule=zb_h1 or zbv) `deferring_weight_grads`
installs the deferring linear on the model's tensor-parallel linears for one step (their
`parallel_linear` / `matmul` attribute, tensor_parallel.py): they compute dX (and the small
bias gradient) in the backward pass and leave (X, dY) here; the schedule's W pass of the same
micro-batch computes dW and hands it to autograd on the weight, as if the backward had:
`param.grad` accumulates and the post-accumulate-grad hooks (the gradient buffer's bucket
counting, grad_buffer.py) fire then, so a bucket is reduced once its weights' W has run. Norm
weights, the embedding and the output head keep theirs in B (small, or outside the layers).
Outside the block the linears are the core's, unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from nanomt.parallel import comm
from nanomt.parallel.comm import Group
from nanomt.parallel.mappings import SEQ_DIM, copy_to_tensor_parallel_region
from nanomt.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class WeightGradStore:
    """The W work of each backward pass, kept by key (micro-batch, chunk) until its W pass."""

    def __init__(self):
        self.current: tuple[int, int] | None = None  # the backward pass running
        self.work: dict[tuple[int, int], list[Callable[[], None]]] = {}

    def put(self, work: Callable[[], None]) -> None:
        self.work.setdefault(self.current, []).append(work)

    @contextlib.contextmanager
    def backward_of(self, key: tuple[int, int]) -> Iterator[None]:
        """The deferred work of this block's backward belongs to pass `key`."""
        self.current = key
        try:
            yield
        finally:
            self.current = None

    def run(self, key: tuple[int, int]) -> None:
        """The W pass of `key`: every weight gradient its backward left."""
        for work in self.work.pop(key, []):
            work()


STORE = WeightGradStore()


@contextlib.contextmanager
def deferring_weight_grads(model_chunks: list[nn.Module]) -> Iterator[WeightGradStore]:
    """Within: the chunks' tensor-parallel linears leave their weight gradients in STORE; by
    the end every W must have run."""
    hooks = {ColumnParallelLinear: ("parallel_linear", deferring_column_linear),
             RowParallelLinear: ("matmul", deferring_linear)}
    linears = [module for chunk in model_chunks for module in chunk.modules()
               if type(module) in hooks]
    for module in linears:  # an instance attribute shadows the class's core function
        setattr(module, *hooks[type(module)])
    STORE.work = {}
    try:
        yield STORE
        left = list(STORE.work)
        if left:
            raise RuntimeError(f"weight gradients of (micro-batch, chunk) {left} had no W pass")
    finally:
        STORE.work = {}
        for module in linears:
            delattr(module, hooks[type(module)][0])


def accumulate_weight_grad(weight: torch.Tensor, grad_weight: torch.Tensor) -> None:
    """Hand dW to autograd at the parameter, as the backward would have: through the view
    (a stacked column weight is a reshape of its parameter) to .grad and its hooks."""
    torch.autograd.backward(weight, grad_weight)


class _LinearDeferringWeightGrad(torch.autograd.Function):
    """y = x W^T + b; backward returns dX and db now and stores dW = dY^T X for the W pass.
    With `sp_group` (sequence parallelism) x is this rank's sequence shard: all-gathered for
    the matmul (and again in W), dX reduce-scattered, as in tensor_parallel's
    _LinearWithSequenceGather."""

    @staticmethod
    def forward(ctx, x, weight, bias, sp_group, attached_weight):
        ctx.sp_group, ctx.has_bias = sp_group, bias is not None
        ctx.save_for_backward(x, weight)
        ctx.weight = attached_weight[0]  # the weight with its path to the parameter, for W
        x_full = x if sp_group is None else comm.all_gather(x, sp_group, dim=SEQ_DIM)
        return F.linear(x_full, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        sp_group, weight_tensor = ctx.sp_group, ctx.weight
        grad_x = grad_y.matmul(weight)
        if sp_group is not None:
            grad_x = comm.reduce_scatter(grad_x, sp_group, dim=SEQ_DIM)
        grad_y_2d = grad_y.reshape(-1, grad_y.shape[-1])
        grad_b = grad_y_2d.sum(dim=0) if ctx.has_bias else None

        @torch.no_grad()  # as inside a backward
        def weight_grad() -> None:
            x_full = x if sp_group is None else comm.all_gather(x, sp_group, dim=SEQ_DIM)
            accumulate_weight_grad(weight_tensor,
                                   grad_y_2d.t().matmul(x_full.reshape(-1, x_full.shape[-1])))

        STORE.put(weight_grad)
        return grad_x, None, grad_b, None, None


def deferring_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     sp_group: Group | None = None) -> torch.Tensor:
    """x W^T + b (x all-gathered over `sp_group` first, if given) with dW left to the W pass."""
    # The function sees the weight detached: backward has no gradient edge to it at all (a
    # None there would still reach the parameter's hooks); W hands dW to the attached one.
    return _LinearDeferringWeightGrad.apply(x, weight.detach(), bias, sp_group, (weight,))


def deferring_column_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            tp_group: Group, sequence_parallel: bool) -> torch.Tensor:
    """tensor_parallel.column_parallel_linear with dW left to the W pass: f then the matmul,
    or under sequence parallelism the gather-and-matmul."""
    if sequence_parallel:
        return deferring_linear(x, weight, bias, tp_group)
    return deferring_linear(copy_to_tensor_parallel_region(x, tp_group), weight, bias)
