"""Context parallelism: the sequence split over a cp group, attention computed as a ring.

Sequence parallelism shards the sequence outside attention; context parallelism shards it
inside too (Liu et al. 2023, ring attention; Megatron-core's context parallelism). Each rank of
a cp group holds s/cp tokens of every sequence: their queries stay put, and the keys and values
travel around the ring, one neighbour per step, so after cp steps every query has met every key.

The load-balanced causal split. Cut the sequence into 2*cp chunks; rank r holds chunks r and
2*cp-1-r. Under a causal mask a late chunk sees many keys and an early one few, so pairing the
r-th earliest with the r-th latest gives every rank the same work.

One block. For a query chunk i and a key/value chunk j (chunk indices in the full sequence):
j > i is fully masked and skipped, j == i is causal within the block, j < i is unmasked:

    S = Q_i K_j^T / sqrt(d),   lse_ij = logsumexp(S, rows),   O_ij = exp(S - lse_ij) V_j

The merge (online softmax). Blocks arrive one at a time; the running (O, lse) of a query chunk
absorbs each block without ever holding a full row of scores:

    lse' = log(exp(lse) + exp(lse_ij)),   O' = exp(lse - lse') O + exp(lse_ij - lse') O_ij

Backward runs the ring again (flash-attention's backward per block, from the saved lse):
P = exp(S - lse), dV_j += P^T dO, dS = P * (dO V_j^T - rowsum(dO * O)), dQ_i += dS K_j / sqrt(d),
dK_j += dS^T Q_i / sqrt(d). dK and dV travel with their K and V and take one last step home.
Each block runs through a fused SDPA kernel that returns its lse (`BlockKernel`: flash or
memory-efficient on CUDA, the flash kernel on CPU), chosen as SDPA itself would; a plain-matmul
block, scores in fp32, only where none applies. Every kernel's blocks go through one `merge`.
The next step's K and V are posted before a step's blocks are computed, so they travel while it
computes; dK and dV can leave only after the blocks that add to them, so their hop is not hidden.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from nanomt.parallel import comm
from nanomt.parallel.comm import Group


def chunk_ids(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two chunks (of 2*cp) that rank `cp_rank` holds: the load-balanced causal split."""
    return cp_rank, 2 * cp - 1 - cp_rank


def local_positions(seq_len: int, cp_rank: int, cp: int,
                    device: torch.device | None = None) -> torch.Tensor:
    """Positions in the full sequence of this rank's tokens, in the order it holds them."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2*cp = {2 * cp}")
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device)
                      for c in chunk_ids(cp_rank, cp)])


def split_sequence(x: torch.Tensor, dim: int, cp_rank: int, cp: int) -> torch.Tensor:
    """This rank's share of `x` along the sequence dimension `dim` (tokens, labels, positions)."""
    if cp == 1:
        return x
    return x.index_select(dim, local_positions(x.shape[dim], cp_rank, cp, x.device))


# ---- one block: (O, lse) forward, dQ dK dV backward, through a kernel -------------------------
class BlockKernel:
    """How one block of attention is computed: `forward` returns O (in the inputs' dtype or
    fp32) and lse (fp32, [.., n]); `backward` returns one block's dQ, dK, dV from the queries'
    final O and lse (the kernels recompute P = exp(S - lse) and delta = rowsum(dO * O) from
    them). Subclasses wrap SDPA's fused kernels that return their lse; `pick_kernel` chooses."""

    name = "matmul"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain-matmul fallback, where no fused kernel applies: scores in fp32 (q and k
        upcast before the product, so cp > 1 rounds nothing that cp = 1 keeps)."""
        scores = _scores(q, k, scale, causal)
        lse = torch.logsumexp(scores, dim=-1)
        return torch.exp(scores - lse.unsqueeze(-1)) @ v.float(), lse

    def backward(self, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P = exp(S - lse), dV = P^T dO, dS = P (dO V^T - delta), dQ = dS K s, dK = dS^T Q s."""
        p = torch.exp(_scores(q, k, scale, causal) - lse.unsqueeze(-1))
        do = grad_out.float()
        delta = (do * out.float()).sum(-1, keepdim=True)
        ds = p * (do @ v.float().transpose(-2, -1) - delta)
        return ds @ k.float() * scale, ds.transpose(-2, -1) @ q.float() * scale, \
            p.transpose(-2, -1) @ do


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    scores = q.float() @ k.float().transpose(-2, -1) * scale
    if causal:
        n = scores.shape[-1]
        future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores


class CpuFlashKernel(BlockKernel):
    """scaled_dot_product_attention's CPU flash kernel, the variant that returns its lse."""

    name = "cpu_flash"

    def __init__(self, ops=torch.ops.aten):
        self.forward_op = ops._scaled_dot_product_flash_attention_for_cpu
        self.backward_op = ops._scaled_dot_product_flash_attention_for_cpu_backward

    def forward(self, q, k, v, scale, causal):
        out, lse = self.forward_op(q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()

    def backward(self, grad_out, q, k, v, out, lse, scale, causal):
        return self.backward_op(grad_out, q, k, v, out.to(q.dtype), lse, 0.0, causal,
                                scale=scale)


class FlashKernel(BlockKernel):
    """CUDA flash attention (fp16/bf16): O and its lse [.., n] in fp32. Ring attention has no
    dropout, so the kernel's random-number state is never read: stand-ins are passed back."""

    name = "flash"

    def __init__(self, ops=torch.ops.aten):
        self.forward_op = ops._scaled_dot_product_flash_attention
        self.backward_op = ops._scaled_dot_product_flash_attention_backward

    def forward(self, q, k, v, scale, causal):
        out, lse = self.forward_op(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse.float()

    def backward(self, grad_out, q, k, v, out, lse, scale, causal):
        unused = torch.empty(0, dtype=torch.int64, device=q.device)
        return self.backward_op(grad_out, q, k, v, out.to(q.dtype), lse.contiguous(), None, None,
                                q.shape[-2], k.shape[-2], 0.0, causal, unused, unused,
                                scale=scale)


class EfficientKernel(BlockKernel):
    """CUDA memory-efficient attention (fp32 too). Its lse comes padded to a multiple of 32
    query rows: cut to n for the merge, padded again for the backward."""

    name = "efficient"
    LSE_ALIGN = 32

    def __init__(self, ops=torch.ops.aten):
        self.forward_op = ops._scaled_dot_product_efficient_attention
        self.backward_op = ops._scaled_dot_product_efficient_attention_backward

    def forward(self, q, k, v, scale, causal):
        out, lse = self.forward_op(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        return out, lse[..., :q.shape[-2]].float()

    def backward(self, grad_out, q, k, v, out, lse, scale, causal):
        padding = -q.shape[-2] % self.LSE_ALIGN
        lse = torch.nn.functional.pad(lse, (0, padding)).contiguous()
        unused = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = self.backward_op(grad_out, q, k, v, None, out.to(q.dtype), lse, unused,
                                         unused, 0.0, [True, True, True, False], causal,
                                         scale=scale)
        return dq, dk, dv


def pick_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockKernel:
    """The fused kernel SDPA itself would accept for these blocks (causal, no mask, no
    dropout): flash, else memory-efficient on CUDA; the CPU flash kernel on CPU; else matmul."""
    if q.device.type == "cuda":
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, True, False)
        if torch.backends.cuda.can_use_flash_attention(params):
            return FlashKernel()
        if torch.backends.cuda.can_use_efficient_attention(params):
            return EfficientKernel()
    elif q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                 torch.float16):
        return CpuFlashKernel()
    return BlockKernel()


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
          block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's (O, lse) into the running (O, lse) of the same queries, in fp32 (the
    one merge for every kernel: a bf16 block output is upcast here)."""
    new_lse = torch.logaddexp(lse, block_lse)
    out = (out * torch.exp(lse - new_lse).unsqueeze(-1)
           + block_out.float() * torch.exp(block_lse - new_lse).unsqueeze(-1))
    return out, new_lse


class _Ring:
    """Send to the next rank of the cp group, receive from the previous one, asynchronously."""

    def __init__(self, group: Group):
        self.group = group
        rank, size = comm.rank_and_size(group)
        self.next = dist.get_global_rank(group, (rank + 1) % size) if size > 1 else 0
        self.prev = dist.get_global_rank(group, (rank - 1) % size) if size > 1 else 0

    def shift(self, tensor: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Post the exchange; returns the receive buffer and the works to wait on."""
        received = torch.empty_like(tensor)
        comm.note_operation("ring attention send/recv", self.group)
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor.contiguous(), self.next, self.group),
            dist.P2POp(dist.irecv, received, self.prev, self.group)])
        return received, works

    def wait(self, works: list) -> None:
        comm.note_operation("wait for ring attention send/recv", self.group)
        for work in works:
            work.wait()


def _block_pairs(cp_rank: int, source: int, cp: int):
    """(i, j, causal) for this rank's query chunk i and the source's key chunk j, unmasked."""
    for i, q_chunk in enumerate(chunk_ids(cp_rank, cp)):
        for j, kv_chunk in enumerate(chunk_ids(source, cp)):
            if kv_chunk <= q_chunk:
                yield i, j, kv_chunk == q_chunk


def _halves(x: torch.Tensor) -> list[torch.Tensor]:
    """The two chunks a rank holds of `x` [.., n, d], each contiguous (what fused kernels read)."""
    return [c.contiguous() for c in x.chunk(2, dim=-2)]


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's queries over the whole cp group's keys and values."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group,
                scale: float, kernel: BlockKernel) -> torch.Tensor:
        cp_rank, cp = comm.rank_and_size(group)
        ring = _Ring(group)
        q_chunks = _halves(q)
        outs = [torch.zeros(c.shape, dtype=torch.float32, device=q.device) for c in q_chunks]
        lses = [torch.full(c.shape[:-1], float("-inf"), device=q.device) for c in q_chunks]
        kv = torch.stack([k, v])
        for step in range(cp):
            if step < cp - 1:  # the next step's keys and values travel while this one computes
                next_kv, works = ring.shift(kv)
            k_chunks, v_chunks = _halves(kv[0]), _halves(kv[1])
            for i, j, causal in _block_pairs(cp_rank, (cp_rank - step) % cp, cp):
                block = kernel.forward(q_chunks[i], k_chunks[j], v_chunks[j], scale, causal)
                outs[i], lses[i] = merge(outs[i], lses[i], *block)
            if step < cp - 1:
                ring.wait(works)
                kv = next_kv
        out, lse = torch.cat(outs, dim=-2).to(q.dtype), torch.cat(lses, dim=-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.kernel = group, scale, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, kernel = ctx.group, ctx.scale, ctx.kernel
        cp_rank, cp = comm.rank_and_size(group)
        ring = _Ring(group)
        q_chunks, do_chunks, out_chunks = _halves(q), _halves(grad_out), _halves(out)
        lse_chunks = [c.contiguous() for c in lse.chunk(2, dim=-1)]
        dq = [torch.zeros(c.shape, dtype=torch.float32, device=q.device) for c in q_chunks]
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for step in range(cp):
            if step < cp - 1:
                next_kv, kv_works = ring.shift(kv)
            k_chunks, v_chunks = _halves(kv[0]), _halves(kv[1])
            dk_chunks, dv_chunks = dkv[0].chunk(2, dim=-2), dkv[1].chunk(2, dim=-2)
            for i, j, causal in _block_pairs(cp_rank, (cp_rank - step) % cp, cp):
                dq_ij, dk_ij, dv_ij = kernel.backward(
                    do_chunks[i], q_chunks[i], k_chunks[j], v_chunks[j], out_chunks[i],
                    lse_chunks[i], scale, causal)
                dq[i].add_(dq_ij)  # summed in fp32, whatever dtype the kernel returns
                dk_chunks[j].add_(dk_ij)
                dv_chunks[j].add_(dv_ij)
            # dK, dV move on with their keys and values; after the last step, one hop home
            if cp > 1:
                dkv, dkv_works = ring.shift(dkv)
                ring.wait(dkv_works)
            if step < cp - 1:
                ring.wait(kv_works)
                kv = next_kv
        dq = torch.cat(dq, dim=-2).to(q.dtype)
        return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group,
                   scale: float | None = None, kernel: BlockKernel | None = None
                   ) -> torch.Tensor:
    """Causal attention over the full sequence for q, k, v [b, heads, s/cp, d] held in the
    load-balanced split (`split_sequence`) by each rank of the cp `group`. Each block runs
    through `kernel` (default: `pick_kernel`, the fused kernel SDPA would use)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kernel = pick_kernel(q, k, v) if kernel is None else kernel
    return RingAttention.apply(q, k, v, group, scale, kernel)
