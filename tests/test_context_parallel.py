"""Ring attention (nanomt.parallel.context_parallel) equals full causal attention.

The reference is torch's own `scaled_dot_product_attention(is_causal=True)` on the whole
sequence; each cp rank holds the load-balanced split of q, k, v and must produce its split of
the reference output and of the reference gradients (fp32, relative 1e-5). One spawn of four
gloo ranks checks cp=2 (two groups, so group ranks differ from global ranks) and cp=4."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanomt.model import GPT, ModelConfig
from nanomt.parallel.context_parallel import (
    BlockKernel,
    CpuFlashKernel,
    EfficientKernel,
    FlashKernel,
    chunk_ids,
    pick_kernel,
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


def ring_case(case: dict, group, cp_rank: int, cp: int, kernel=None) -> dict[str, torch.Tensor]:
    """This rank's ring-attention output and gradients next to its split of the reference."""
    local = {name: split_sequence(t, 2, cp_rank, cp) for name, t in case.items()}
    q, k, v = (local[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = ring_attention(q, k, v, group, kernel=kernel)
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
            "cp4_cuda_flash_wrapper": ring_case(case, quad, rank, 4, FlashKernel(CudaOpsOnCpu())),
            "cp2_matmul": ring_case(case, pair, dist.get_rank(pair), 2, BlockKernel()),
            "bytes_cp2": saved_activation_bytes(ParallelGrid(cp=2, dp=2)),
            "bytes_cp4": saved_activation_bytes(ParallelGrid(cp=4))}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_ring_checks, world_size=4, timeout_s=120)


def test_ring_attention_equals_full_attention_at_cp_2_and_4(ranks):
    for rank, result in enumerate(ranks):
        for cp in ("cp2", "cp4", "cp4_cuda_flash_wrapper", "cp2_matmul"):
            assert max(result[cp].values()) < 1e-5, (rank, cp, result[cp])


def test_activation_bytes_per_rank_fall_as_one_over_cp(ranks):
    """Every activation (attention's q, k, v, output and log-sum-exp too) scales with the
    tokens a rank holds; the ring keeps no full-sequence tensor."""
    whole = saved_activation_bytes(None)
    for result in ranks:
        for cp in (2, 4):
            assert result[f"bytes_cp{cp}"] / whole == pytest.approx(1 / cp, rel=0.1), cp


class CudaOpsOnCpu:
    """Stand-ins for SDPA's CUDA kernels with their exact calling conventions and results (the
    flash kernel's nine outputs; the efficient kernel's lse padded to 32 rows, the padding NaN
    so that a wrapper which forgets to cut it poisons the output), computed by the CPU kernel:
    FlashKernel and EfficientKernel run on CPU through the code they run on a GPU."""

    def __init__(self):
        self.calls: list[str] = []
        self.cpu = torch.ops.aten

    def _scaled_dot_product_flash_attention(self, q, k, v, dropout_p, is_causal,
                                            return_debug_mask, *, scale):
        assert dropout_p == 0.0 and return_debug_mask is False
        self.calls.append("flash")
        out, lse = self.cpu._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, scale=scale)
        rng = torch.empty(2, dtype=torch.int64)
        return out, lse, None, None, q.shape[-2], k.shape[-2], rng, rng, torch.empty(0)

    def _scaled_dot_product_flash_attention_backward(
            self, do, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal,
            seed, offset, *, scale):
        assert (cum_q, cum_k, max_q, max_k) == (None, None, q.shape[-2], k.shape[-2])
        assert dropout_p == 0.0 and out.dtype == q.dtype and lse.dtype == torch.float32
        assert isinstance(seed, torch.Tensor) and isinstance(offset, torch.Tensor)
        self.calls.append("flash backward")
        return self.cpu._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, is_causal, scale=scale)

    def _scaled_dot_product_efficient_attention(self, q, k, v, bias, compute_lse, dropout_p,
                                                is_causal, *, scale):
        assert bias is None and compute_lse is True and dropout_p == 0.0
        self.calls.append("efficient")
        out, lse = self.cpu._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, scale=scale)
        padded = torch.full((*lse.shape[:-1], -(-lse.shape[-1] // 32) * 32), float("nan"))
        padded[..., :lse.shape[-1]] = lse
        return out, padded, torch.empty(()), torch.empty(())

    def _scaled_dot_product_efficient_attention_backward(
            self, do, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask,
            is_causal, *, scale):
        assert bias is None and grad_input_mask == [True, True, True, False]
        assert lse.shape[-1] % 32 == 0 and lse.is_contiguous()
        self.calls.append("efficient backward")
        grads = self.cpu._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse[..., :q.shape[-2]], 0.0, is_causal, scale=scale)
        return (*grads, None)


def every_kernel() -> list:
    stand_in = CudaOpsOnCpu()
    return [BlockKernel(), CpuFlashKernel(), FlashKernel(stand_in), EfficientKernel(stand_in)]


@pytest.mark.parametrize("kernel", every_kernel(), ids=lambda kernel: kernel.name)
def test_every_block_kernel_through_the_merge_equals_sdpa_on_the_full_sequence(kernel):
    """At cp=1 a rank still computes three blocks (two causal, one full) and merges them: the
    same merge code for every kernel, CUDA's wrappers included, against SDPA (out and grads)."""
    case = full_attention_case(seed=3)
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = ring_attention(q, k, v, None, kernel=kernel)
    out.backward(case["grad"])
    for name, got in (("out", out.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        error = ((got - case[name]).norm() / case[name].norm()).item()
        assert error < 1e-5, (kernel.name, name, error)
    if isinstance(kernel, (FlashKernel, EfficientKernel)):  # both passes went through the op
        assert {kernel.name, f"{kernel.name} backward"} <= set(kernel.forward_op.__self__.calls)


def test_the_kernel_choice_on_cpu_is_the_fused_flash_kernel():
    q = torch.randn(1, 2, 8, 8)
    assert isinstance(pick_kernel(q, q, q), CpuFlashKernel)
    assert type(pick_kernel(q.to(torch.int32), q, q)) is BlockKernel


def fp64_block(q, k, v, scale, causal, grad_out):
    """One block's O, lse and gradients in fp64 from the same (rounded) inputs."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v
    out.backward(grad_out.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("causal", [False, True])
def test_the_matmul_fallback_scores_in_fp32_from_bf16_inputs(causal):
    """bf16 q, k: the scores must be formed in fp32 (upcast before the product): a bf16 product
    rounds scores of size ~4 by ~1e-2; fp32 keeps the block within 1e-4 of fp64."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, grad_out = (2 * torch.randn(1, 2, 16, 8, generator=gen) for _ in range(4))
    q, k, v, grad_out = (t.bfloat16() for t in (q, k, v, grad_out))
    kernel, scale = BlockKernel(), 8 ** -0.5
    out, lse = kernel.forward(q, k, v, scale, causal)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = fp64_block(q, k, v, scale, causal, grad_out)
    assert out.dtype == lse.dtype == torch.float32
    assert (lse.double() - ref_lse).abs().max() < 1e-4
    assert (out.double() - ref_out).abs().max() < 1e-4
    grads = kernel.backward(grad_out, q, k, v, out, lse, scale, causal)
    for got, ref in zip(grads, (ref_dq, ref_dk, ref_dv)):
        assert got.dtype == torch.float32
        assert (got.double() - ref).abs().max() < 1e-4 * ref.abs().max()
