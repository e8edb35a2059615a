"""AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization") with MT-NLG's
parameter groups: weight decay on matrices, none on biases and norms.

Decoupled weight decay shrinks the weights directly, w <- w (1 - lr * wd), instead of adding
wd * w to the gradient (which Adam's per-element scaling would distort).
"""

from __future__ import annotations

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (ndim >= 2: linears, embeddings) decay; vectors (biases, norm gains) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float) -> torch.optim.AdamW:
    # foreach=False: the reference per-tensor loop, so results do not depend on how tensors
    # happen to be grouped (keeps single-process and sharded runs bitwise comparable).
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             foreach=False)


def adamw_update_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor, step: int, lr: float, betas: tuple[float, float],
                  eps: float) -> None:
    """One Adam step on flat fp32 tensors, in place: the same element-wise math (and operation
    order) as torch.optim.AdamW's single-tensor path, so a sharded update matches it bitwise.

        m <- b1 m + (1 - b1) g        v <- b2 v + (1 - b2) g^2
        w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Decoupled weight decay, w <- w (1 - lr * wd), is applied by the caller before this update
    (per parameter: it depends on the parameter group).
    """
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def adamw_update_foreach_(masters: list[torch.Tensor], grads: list[torch.Tensor],
                          exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                          step: int, lr: float, betas: tuple[float, float], eps: float) -> None:
    """`adamw_update_` on many flat tensors at once: the same operations in the same order, each
    a torch._foreach_* kernel over the whole list (one launch per operation on CUDA instead of
    one per tensor), so the result is the single-tensor path's, bit for bit."""
    beta1, beta2 = betas
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias_correction2_sqrt)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(masters, exp_avgs, denoms, value=-lr / bias_correction1)


def adamw_update_foreach_gated_(masters: list[torch.Tensor], grads: list[torch.Tensor],
                                exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                                step: torch.Tensor, lr: float, betas: tuple[float, float],
                                eps: float, update: torch.Tensor) -> None:
    """`adamw_update_foreach_` with the step decided on the device: `update` (a bool tensor)
    False leaves every tensor as it was, so the caller needs no host read to skip an inf/nan
    step (logging.metrics_interval > 1). Costs two passes more than the ungated update.

    step: Adam's step t of this update (int64 tensor, on the device). The per-step numbers are
    computed there in fp64, as the host computes Python floats, and rounded to fp32, as a kernel
    rounds a Python scalar; (s m) / d followed by an add is addcdiv's own order. So an update is
    the single-tensor path's, bit for bit (tests/test_lean_step.py). A skipped step multiplies
    by 1, lerps with weight 0, adds 0: the gradients must then be finite, so they are zeroed
    first (nan * 0 is nan); they are scratch the caller discards.
    """
    beta1, beta2 = betas
    skip = ~update
    for grad in grads:  # a no-op on a clean step; one kernel per tensor (no foreach where)
        grad.masked_fill_(skip, 0.0)
    torch._foreach_lerp_(exp_avgs, grads, [torch.where(update, 1 - beta1, 0.0)] * len(grads))
    torch._foreach_mul_(exp_avg_sqs, torch.where(update, beta2, 1.0))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)  # + 0 when skipped
    t = step.double()
    bias_correction1 = 1 - torch.pow(beta1, t)
    bias_correction2_sqrt = (1 - torch.pow(beta2, t)).sqrt().float()
    step_size = (bias_correction1.new_full((), -lr) / bias_correction1).float() * update
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias_correction2_sqrt)
    torch._foreach_add_(denoms, eps)
    steps = torch._foreach_mul(exp_avgs, step_size)  # -lr / (1 - b1^t) m, or 0 when skipped
    torch._foreach_div_(steps, denoms)
    torch._foreach_add_(masters, steps)


def decays(param: torch.Tensor) -> bool:
    """The parameter-group rule of `parameter_groups`: matrices decay, vectors do not."""
    return param.ndim >= 2
