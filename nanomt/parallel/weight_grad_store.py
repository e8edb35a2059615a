"""Deferred weight gradients: a linear's backward split into B and W (Qi et al. 2024).

For Y = X W^T (+ b), backward computes two things from the output gradient dY:

    B   dX = dY W        what the previous layer (and pipeline stage) waits for
    W   dW = dY^T X      what only the optimizer needs

Under the zero-bubble schedule (parallel.schedule=zb_h1) the tensor-parallel linears compute
dX (and the small bias gradient) in the backward pass and leave (X, dY) here; the schedule's W
pass of the same micro-batch computes dW and hands it to autograd on the weight, as if the
backward had: `param.grad` accumulates and the post-accumulate-grad hooks (the gradient
buffer's bucket counting, grad_buffer.py) fire then, so a bucket is reduced once its
weights' W has run. Norm weights and the embedding keep theirs in B (small). Outside
`deferring_weight_grads()` nothing is stored and the linears run unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from nanomt.parallel import comm
from nanomt.parallel.comm import Group
from nanomt.parallel.mappings import SEQ_DIM


class WeightGradStore:
    """The W work of each backward pass, kept by key (micro-batch, chunk) until its W pass."""

    def __init__(self):
        self.active = False
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


def recomputing(unit_in_backward: bool) -> bool:
    """Whether a module's forward is an activation-checkpointing recompute: inside a B pass
    under the zero-bubble schedule (where a unit waiting for its W may run a genuine forward
    of the next micro-batch), else while its unit is in backward (ZeRO-3, stage3.py)."""
    return STORE.current is not None if STORE.active else unit_in_backward


@contextlib.contextmanager
def deferring_weight_grads() -> Iterator[WeightGradStore]:
    """Within: the tensor-parallel linears built by `linear` defer their weight gradients."""
    STORE.active, STORE.work = True, {}
    try:
        yield STORE
        left = list(STORE.work)
        if left:
            raise RuntimeError(f"weight gradients of (micro-batch, chunk) {left} had no W pass")
    finally:
        STORE.active, STORE.work = False, {}


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


def deferring_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     sp_group: Group | None = None) -> torch.Tensor:
    """x W^T + b (x all-gathered over `sp_group` first, if given) with dW left to the W pass."""
    # The function sees the weight detached: backward has no gradient edge to it at all (a
    # None there would still reach the parameter's hooks); W hands dW to the attached one.
    return _LinearDeferringWeightGrad.apply(x, weight.detach(), bias, sp_group, (weight,))
