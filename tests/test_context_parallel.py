"""Ring attention (nanomt.parallel.context_parallel) equals full causal attention.

The reference is torch's own `scaled_dot_product_attention(is_causal=True)` on the whole
sequence; each cp rank holds the load-balanced split of q, k, v and must produce its split of
the reference output and of the reference gradients (fp32, relative 1e-5). One spawn of four
gloo ranks checks cp=2 (two groups, so group ranks differ from global ranks) and cp=4."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanomt.parallel.context_parallel import (
    chunk_ids,
    local_positions,
    ring_attention,
    split_sequence,
)
from nanomt.testing import run_distributed

B, HEADS, SEQ, DIM = 2, 3, 32, 8


def full_attention_case(seed: int = 0) -> dict[str, torch.Tensor]:
    """q, k, v, an output gradient, and torch's output and gradients on the whole sequence."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, HEADS, SEQ, DIM, generator=gen) for _ in range(4))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(grad)
    return {"q": q.detach(), "k": k.detach(), "v": v.detach(), "grad": grad,
            "out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def ring_case(case: dict, group, cp_rank: int, cp: int) -> dict[str, torch.Tensor]:
    """This rank's ring-attention output and gradients next to its split of the reference."""
    local = {name: split_sequence(t, 2, cp_rank, cp) for name, t in case.items()}
    q, k, v = (local[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = ring_attention(q, k, v, group)
    out.backward(local["grad"])
    errors = {}
    for name, got in (("out", out.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        errors[name] = ((got - local[name]).norm() / local[name].norm()).item()
    return errors


def test_the_split_gives_every_rank_two_chunks_and_covers_the_sequence():
    assert [chunk_ids(r, 4) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    positions = torch.cat([local_positions(16, r, 4) for r in range(4)])
    assert sorted(positions.tolist()) == list(range(16))
    assert local_positions(16, 1, 4).tolist() == [2, 3, 12, 13]
    x = torch.arange(16).view(1, 16)
    assert split_sequence(x, 1, 1, 4).tolist() == [[2, 3, 12, 13]]


def test_ring_attention_on_one_rank_is_causal_attention():
    errors = ring_case(full_attention_case(), None, 0, 1)
    assert max(errors.values()) < 1e-5, errors


def _ring_checks() -> dict:
    rank = dist.get_rank()
    case = full_attention_case(seed=1)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    quad = dist.new_group([0, 1, 2, 3])
    pair = pairs[rank // 2]
    return {"cp2": ring_case(case, pair, dist.get_rank(pair), 2),
            "cp4": ring_case(case, quad, rank, 4)}


def test_ring_attention_equals_full_attention_at_cp_2_and_4():
    for rank, result in enumerate(run_distributed(_ring_checks, world_size=4, timeout_s=120)):
        for cp, errors in result.items():
            assert max(errors.values()) < 1e-5, (rank, cp, errors)
