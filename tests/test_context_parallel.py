"""Ring attention (nanomt.parallel.context_parallel) equals full causal attention.

The reference is torch's own `scaled_dot_product_attention(is_causal=True)` on the whole
sequence; each cp rank holds the load-balanced split of q, k, v and must produce its split of
the reference output and of the reference gradients (fp32, relative 1e-5). One spawn of four
gloo ranks checks cp=2 (two groups, so group ranks differ from global ranks) and cp=4."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanomt.model import GPT, ModelConfig
from nanomt.parallel.context_parallel import (
    chunk_ids,
    local_positions,
    ring_attention,
    split_sequence,
)
from nanomt.parallel.grid import ParallelGrid
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


@pytest.mark.parametrize("cp", [2, 4])
def test_the_split_gives_every_rank_two_chunks_and_covers_the_sequence(cp):
    """Every rank's positions, in order: chunk r then chunk 2cp-1-r (the load-balanced causal
    split), written out here for each rank, not only as a covering set."""
    seq_len, chunk = 16, 16 // (2 * cp)
    x = torch.arange(100, 100 + seq_len).view(1, seq_len)
    for r in range(cp):
        first, second = r, 2 * cp - 1 - r
        expected = (list(range(first * chunk, (first + 1) * chunk))
                    + list(range(second * chunk, (second + 1) * chunk)))
        assert chunk_ids(r, cp) == (first, second)
        assert local_positions(seq_len, r, cp).tolist() == expected, r
        assert split_sequence(x, 1, r, cp).tolist() == [[100 + p for p in expected]], r
    positions = torch.cat([local_positions(seq_len, r, cp) for r in range(cp)])
    assert sorted(positions.tolist()) == list(range(seq_len))


def test_ring_attention_on_one_rank_is_causal_attention():
    errors = ring_case(full_attention_case(), None, 0, 1)
    assert max(errors.values()) < 1e-5, errors


MODEL = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, seq_len=256, vocab_size=96,
                    dropout=0.0)


def saved_activation_bytes(grid: ParallelGrid | None) -> int:
    """Bytes autograd keeps for backward over one forward of the GPT (weights excluded), for a
    batch of 2 sequences of which this rank holds its cp share."""
    model = GPT(MODEL, grid)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_len))
    cp_rank, cp = (grid.cp_rank, grid.cp_size) if grid is not None else (0, 1)
    tokens = split_sequence(tokens, 1, cp_rank, cp)
    kept = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, tokens)
    return sum(kept.values())


def _ring_checks() -> dict:
    rank = dist.get_rank()
    case = full_attention_case(seed=1)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    quad = dist.new_group([0, 1, 2, 3])
    pair = pairs[rank // 2]
    return {"cp2": ring_case(case, pair, dist.get_rank(pair), 2),
            "cp4": ring_case(case, quad, rank, 4),
            "bytes_cp2": saved_activation_bytes(ParallelGrid(cp=2, dp=2)),
            "bytes_cp4": saved_activation_bytes(ParallelGrid(cp=4))}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_ring_checks, world_size=4, timeout_s=120)


def test_ring_attention_equals_full_attention_at_cp_2_and_4(ranks):
    for rank, result in enumerate(ranks):
        for cp in ("cp2", "cp4"):
            assert max(result[cp].values()) < 1e-5, (rank, cp, result[cp])


def test_activation_bytes_per_rank_fall_as_one_over_cp(ranks):
    """Every activation (attention's q, k, v, output and log-sum-exp too) scales with the
    tokens a rank holds; the ring keeps no full-sequence tensor."""
    whole = saved_activation_bytes(None)
    for result in ranks:
        for cp in (2, 4):
            assert result[f"bytes_cp{cp}"] / whole == pytest.approx(1 / cp, rel=0.1), cp


def test_the_spelled_out_block_equals_the_fused_kernel(monkeypatch):
    """Off CPU the block is plain maths: on CPU it must equal the fused kernel it replaces."""
    from nanomt.parallel import context_parallel

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, HEADS, 8, DIM, generator=gen) for _ in range(3))
    fused = [context_parallel.attention_block(q, k, v, 0.3, causal) for causal in (False, True)]
    monkeypatch.setattr(context_parallel, "_FLASH_CPU", None)
    for causal, (out, lse) in zip((False, True), fused):
        spelled = context_parallel.attention_block(q, k, v, 0.3, causal)
        torch.testing.assert_close(spelled[0], out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(spelled[1], lse, rtol=1e-5, atol=1e-6)
    errors = ring_case(full_attention_case(), None, 0, 1)
    assert max(errors.values()) < 1e-5, errors
