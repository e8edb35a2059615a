"""Vocab-parallel cross-entropy: the loss without ever gathering the full logits.

Each tp rank holds logits z for its slice of the vocabulary. For one token with target y:

    loss = log(sum_j exp(z_j - m)) - (z_y - m),   m = max_j z_j

needs only three scalars per token from across the group: the max m (all-reduce MAX), the sum
of exponentials (all-reduce SUM) and z_y (all-reduce SUM, nonzero on the rank owning y). The
gradient is softmax(z) - onehot(y), computed locally. Memory per rank: b*s*V/t, never b*s*V.

Padding columns (so that t divides V) get -inf logits: no probability mass, the loss of the
unpadded vocabulary. On a tp group of one torch's fused cross-entropy computes the same loss in
fewer passes. Targets must lie in [0, vocab_size) (no ignore_index: a -100 would take a padding
column's zero gradient); the check runs on the device (`torch._assert_async`): no host sync.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanomt.parallel import comm
from nanomt.parallel.comm import Group


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size):
        rank, _ = comm.rank_and_size(group)
        per_rank = logits.shape[-1]
        start = rank * per_rank
        ctx.input_dtype = logits.dtype
        logits = logits.to(torch.float32, copy=True)  # our own buffer, reused in place below
        num_real_here = max(0, min(per_rank, vocab_size - start))
        if num_real_here < per_rank:
            logits[..., num_real_here:] = float("-inf")

        logits_max = logits.max(dim=-1).values
        comm.all_reduce(logits_max, group, op=dist.ReduceOp.MAX)
        logits.sub_(logits_max.unsqueeze(-1))

        not_mine = (target < start) | (target >= start + per_rank)
        local_target = (target - start).masked_fill(not_mine, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(not_mine, 0.0)

        exp_logits = logits.exp_()
        sum_exp = exp_logits.sum(dim=-1)
        both = comm.all_reduce(torch.stack([target_logit, sum_exp]), group)
        target_logit, sum_exp = both[0], both[1]

        loss = torch.log(sum_exp) - target_logit
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, not_mine, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, not_mine, local_target = ctx.saved_tensors
        grad = softmax  # reuse the saved buffer: d loss / d z = softmax - onehot(y)
        onehot_here = (~not_mine).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot_here)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group: Group,
                                 vocab_size: int) -> torch.Tensor:
    """Per-token loss from vocab-split logits [..., V_padded/t] and targets [...] (global ids
    in [0, vocab_size); anything else, e.g. an ignore_index of -100, is an error)."""
    in_range = ((target >= 0) & (target < vocab_size)).all()
    torch._assert_async(in_range, f"cross-entropy targets must lie in [0, {vocab_size}) "
                                  f"(model.vocab_size); ignore_index is not supported")
    if comm.group_size(tp_group) == 1:  # nothing split: torch's fused kernel, padding cut off
        real = logits[..., :vocab_size].float()
        return F.cross_entropy(real.flatten(0, -2), target.flatten(),
                               reduction="none").view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, vocab_size)
