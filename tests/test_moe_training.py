"""Experts' weights under data parallelism and ZeRO 0-3, against one process.

A stand-in model (no nanomt.model code): one layer with a dense matrix, a stack of E experts'
matrices marked ParamInfo.expert and split over the ep group, and a deterministic route (row t
goes to expert route[t], E rows per expert) with an explicit all_to_all to the experts' ranks and
back, then a dense head. Every rank of the dp x cp ranks sees its own data; the single process
sees all of it, with every expert, and averages the ranks' losses. One spawn of 4 ranks checks,
for ep = 1, 2, 4 with dp up to 4 (and with cp, and with tp replicas), at ZeRO 0-3 (ZeRO-2/3
also reducing every micro-batch), two micro-batches per step:
  - experts' weights sit in buckets of their own, reduced over expert_dp_group;
  - after finalize_grads every gradient (dense and experts', at their global expert index) is
    the single process's gradient: expert buckets are summed over expert_dp_group and divided
    by dp * cp (docs/moe.md);
  - the global gradient norm is the single process's (each expert element counted once);
  - one clipped AdamW step gives the single process's parameters, on every rank (the
    parameters' all-gathers, ZeRO-3's included, run over each bucket's group).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from nanomt.parallel.param_info import ParamInfo, param_info, set_param_info
from nanomt.testing import run_distributed

E, H, ROWS_PER_EXPERT, MICROBATCHES = 4, 6, 2, 2
T = E * ROWS_PER_EXPERT  # rows (tokens) per micro-batch and rank
OPTIM = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
GRAD_CLIP = 0.05  # below the norm: clipping acts
# (tp, dp, cp, ep) on 4 ranks; the stand-in model is replicated over tp
LAYOUTS = ((1, 4, 1, 1), (1, 4, 1, 2), (1, 4, 1, 4), (1, 2, 2, 4), (2, 2, 1, 2))
# (ZeRO stage, parallel.grad_reduce, parallel.overlap_param_gather)
MODES = ((0, "step", False), (1, "step", False), (2, "step", False), (3, "step", False),
         (2, "microbatch", True), (3, "microbatch", False))


class _AllToAll(torch.autograd.Function):
    """Equal splits of dim 0 exchanged over `group`; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.group), None


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _AllToAll.apply(x, group)


def _global_values(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    seed = sum(map(ord, name))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5


def _described(name: str, global_shape: tuple[int, ...], expert: bool, ep: int,
               ep_rank: int) -> nn.Parameter:
    """This rank's piece of a weight drawn whole from a seed: an expert stack's 1/ep."""
    full = _global_values(name, global_shape)
    param = nn.Parameter((full.chunk(ep)[ep_rank] if expert else full).clone())
    set_param_info(param, ParamInfo(name, global_shape, tp_split_dim=None, expert=expert))
    return param


class ExpertLayer(nn.Module):
    """y = tanh(x W); each row through its expert (on the expert's ep rank); y + expert(y)."""

    def __init__(self, ep: int, ep_rank: int, ep_group):
        super().__init__()
        self.ep, self.ep_group = ep, ep_group
        self.dense = _described("layers.0.dense", (H, H), False, ep, ep_rank)
        self.experts = _described("layers.0.experts", (E, H, H), True, ep, ep_rank)
        route = torch.randperm(T, generator=torch.Generator().manual_seed(7)) % E
        self.order = torch.argsort(route, stable=True)  # rows sorted by expert
        self.inverse = torch.argsort(self.order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x @ self.dense)
        sent = y[self.order]  # ep blocks: the rows for each ep rank's experts
        got = all_to_all(sent, self.ep_group).view(self.ep, E // self.ep, ROWS_PER_EXPERT, H)
        out = torch.einsum("serh,ehk->serk", got, self.experts).reshape(T, H)
        return y + all_to_all(out, self.ep_group)[self.inverse]


class StandIn(nn.Module):
    def __init__(self, ep: int = 1, ep_rank: int = 0, ep_group=None):
        super().__init__()
        self.layers = nn.ModuleList([ExpertLayer(ep, ep_rank, ep_group)])
        self.head = _described("head", (H,), False, ep, ep_rank)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((self.layers[0](x) @ self.head - target) ** 2).mean()


def rank_data(j: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batches of dp x cp rank j at `step`: inputs [m, T, H], targets [m, T]."""
    generator = torch.Generator().manual_seed(100 + j + 1000 * step)
    return (torch.randn(MICROBATCHES, T, H, generator=generator),
            torch.randn(MICROBATCHES, T, generator=generator))


def _box(param: nn.Parameter, grid) -> list[list[int]]:
    return param_info(param).box(tuple(param.shape), grid.tp_rank, grid.ep_rank)


def flat_pieces(buffer, shards: list[torch.Tensor], grid) -> list[tuple]:
    """(name, box, lo, hi, values): each segment of my shards of the buffer's buckets, the
    elements [lo, hi) of the flattened piece `box` of the global tensor `name`."""
    return [(param_info(s.param).name, _box(s.param, grid), s.param_lo, s.param_hi,
             shard[s.shard_lo: s.shard_hi].clone())
            for b, shard in zip(buffer.buckets, shards) for s in b.segments]


def whole_pieces(chunks: list[nn.Module], grid) -> list[tuple]:
    """(name, box, 0, numel, values) of every parameter of `chunks`, whole."""
    return [(param_info(p).name, _box(p, grid), 0, p.numel(), p.detach().reshape(-1).clone())
            for chunk in chunks for p in chunk.parameters()]


def _one_layout(tp: int, dp: int, cp: int, ep: int) -> dict:
    from nanomt.optim.grad_norm import read_norm
    from nanomt.optim.sharded_adamw import ShardedAdamW
    from nanomt.parallel.data_parallel import GradientBuffer, finalize_grads
    from nanomt.parallel.grid import ParallelGrid

    grid = ParallelGrid(tp=tp, dp=dp, cp=cp, ep=ep)
    x, target = rank_data(grid.dp_rank * cp + grid.cp_rank)
    results = {}
    for stage, grad_reduce, overlap in MODES:
        model = StandIn(ep, grid.ep_rank, grid.ep_group)
        buffer = GradientBuffer([model], grid, zero_stage=stage, num_microbatches=MICROBATCHES,
                                bucket_size_mb=1e-4, grad_reduce=grad_reduce,
                                overlap_param_gather=overlap)
        optimizer = ShardedAdamW(buffer, **OPTIM, grad_clip=GRAD_CLIP)
        for i in range(MICROBATCHES):
            (model(x[i], target[i]) / MICROBATCHES).backward()
        finalize_grads(buffer)
        grads = flat_pieces(buffer, buffer.local_grad_shards(), grid)
        norm, overflow, _ = read_norm(optimizer.clip_grads())
        optimizer.step(norm, overflow)
        buffer.wait_for_params()  # the gathers overlap_param_gather leaves in flight
        with optimizer.full_parameters():  # every rank's whole tensors, gathered at ZeRO-3
            params = whole_pieces([model], grid)
        results[(stage, grad_reduce, overlap)] = {
            "grads": grads, "params": params, "norm": norm, "overflow": overflow,
            "buckets": [([param_info(p).expert for p in b.params], b.group_size)
                        for b in buffer.buckets]}
    return results


def _every_layout() -> dict:
    return {layout: _one_layout(*layout) for layout in LAYOUTS}


def single_process_step(ranks: int) -> tuple[dict, float, dict]:
    """The reference: the data of `ranks` dp x cp ranks through the whole model, their losses
    averaged; torch's clip and AdamW. Returns (gradients, norm before clipping, parameters)."""
    model = StandIn()
    loss = 0.0
    for j in range(ranks):
        x, target = rank_data(j)
        for i in range(MICROBATCHES):
            loss = loss + model(x[i], target[i]) / (MICROBATCHES * ranks)
    loss.backward()
    named = {param_info(p).name: p for p in model.parameters()}
    grads = {name: p.grad.clone() for name, p in named.items()}
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP))
    groups = [{"params": [p for p in named.values() if p.ndim >= 2]},
              {"params": [p for p in named.values() if p.ndim < 2], "weight_decay": 0.0}]
    torch.optim.AdamW(groups, **OPTIM, foreach=True).step()
    return grads, norm, {name: p.detach().clone() for name, p in named.items()}


def assemble(pieces: list[tuple], shapes: dict[str, tuple], atol: float = 0.0) -> dict:
    """The global tensors from every rank's pieces (flat_pieces, whole_pieces): every element
    covered by some rank, the copies of one element equal (within `atol`). Rows of a box past
    the global shape (the vocabulary's padding) are dropped."""
    full = {}
    for name, box, lo, hi, values in pieces:
        if name not in full:
            padded = [max(n, b[1]) for n, b in zip(shapes[name], box)]
            full[name] = torch.full(padded, float("nan"), dtype=values.dtype)
        region = tuple(slice(a, b) for a, b in box)
        piece = full[name][region].clone()
        seen = piece.view(-1)[lo:hi]
        known = ~torch.isnan(seen)  # copies of elements another rank gave
        torch.testing.assert_close(values[known], seen[known], rtol=0, atol=atol)
        seen.copy_(values)
        full[name][region] = piece
    full = {name: tensor[tuple(slice(0, n) for n in shapes[name])]
            for name, tensor in full.items()}
    for name in shapes:
        assert name in full and not torch.isnan(full[name]).any(), f"{name}: not on any rank"
    return full


def test_expert_buckets_reduce_norm_and_step_as_one_process():
    results = run_distributed(_every_layout, world_size=4, timeout_s=300)
    references = {ranks: single_process_step(ranks) for ranks in (2, 4)}
    for layout in LAYOUTS:
        tp, dp, cp, ep = layout
        ref_grads, ref_norm, ref_params = references[dp * cp]
        assert ref_norm > GRAD_CLIP
        shapes = {name: tuple(g.shape) for name, g in ref_grads.items()}
        for mode in MODES:
            per_rank = [r[layout][mode] for r in results]
            where = f"(tp, dp, cp, ep)={layout}, (ZeRO, grad_reduce, overlap)={mode}"
            for r in per_rank:
                for flags, group_size in r["buckets"]:
                    assert len(set(flags)) == 1, f"{where}: experts mixed with dense params"
                    assert group_size == (dp * cp // ep if flags[0] else dp * cp), where
                assert not r["overflow"]
                assert abs(r["norm"] - ref_norm) <= 1e-5 * ref_norm, (where, r["norm"], ref_norm)
            grads = assemble([p for r in per_rank for p in r["grads"]], shapes)
            params = assemble([p for r in per_rank for p in r["params"]], shapes)
            for name in shapes:
                torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{where} gradient of {name}: {m}")
                torch.testing.assert_close(params[name], ref_params[name], rtol=1e-5,
                                           atol=1e-6, msg=lambda m: f"{where} {name}: {m}")


# ---- the real layer (nanomt.model.moe) in every layout --------------------------------------
SEED, M, BATCH = 1234, 2, 2  # micro-batches per rank, sequences per micro-batch
# (style, tp, pp, dp, ep, ZeRO stage, sequence parallel, pipeline schedule) on 4 ranks
REAL_LAYOUTS = (("llama", 1, 1, 4, 2, 1, False, "1f1b"), ("llama", 1, 1, 4, 2, 3, False, "1f1b"),
                ("llama", 1, 1, 4, 4, 1, False, "1f1b"), ("gpt", 1, 1, 4, 4, 3, False, "1f1b"),
                ("llama", 2, 1, 2, 2, 3, True, "1f1b"), ("gpt", 2, 1, 2, 2, 1, True, "1f1b"),
                ("llama", 1, 2, 2, 2, 1, False, "1f1b"), ("llama", 1, 2, 2, 2, 3, False, "zb_h1"))


def moe_config(style: str):
    """Four layers, MoE in layers 1 and 3 (dense MLPs in 0 and 2), 4 experts, top-2, one
    shared expert, both router losses."""
    from nanomt.model import ModelConfig

    return ModelConfig(style=style, num_layers=4, hidden_size=32, num_heads=4, seq_len=16,
                       vocab_size=64, ffn_hidden_size=64,
                       moe={"num_experts": 4, "top_k": 2, "ffn_hidden_size": 32, "every": 2,
                            "shared_experts": 1, "aux_loss_coef": 0.01, "z_loss_coef": 0.001})


def rank_micro_batches(j: int, cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """dp rank j's M micro-batches (inputs, targets) of BATCH sequences."""
    g = torch.Generator().manual_seed(10 + j)
    tokens = torch.randint(0, cfg.vocab_size, (M, BATCH, cfg.seq_len + 1), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def real_reference(style: str, dp: int) -> dict:
    """One process, every dp rank's micro-batches in turn: (loss, gradients, their norm)."""
    from nanomt.model import GPT
    from nanomt.model.moe import set_aux_loss_scale
    from nanomt.parallel.no_pipelining import forward_backward_no_pipelining

    cfg = moe_config(style)
    model = GPT(cfg, None, seed=SEED)
    micro_batches = [mb for j in range(dp) for mb in rank_micro_batches(j, cfg)]
    set_aux_loss_scale([model], 1.0 / len(micro_batches))
    loss_sum = forward_backward_no_pipelining([model], micro_batches)
    grads = {param_info(p).name: p.grad.clone() for p in model.parameters()}
    norm = float(torch.stack([g.double().norm() for g in grads.values()]).norm())
    return {"loss": float(loss_sum) / len(micro_batches), "grads": grads, "norm": norm}


def _real_layout(style: str, tp: int, pp: int, dp: int, ep: int, stage: int, sp: bool,
                 schedule: str) -> dict:
    from nanomt.model.chunks import build_model_chunks
    from nanomt.model.moe import set_aux_loss_scale
    from nanomt.optim.grad_norm import read_norm
    from nanomt.optim.sharded_adamw import ShardedAdamW
    from nanomt.parallel import comm
    from nanomt.parallel.data_parallel import GradientBuffer, finalize_grads
    from nanomt.parallel.grid import ParallelGrid
    from nanomt.parallel.forward_backward import get_forward_backward_func

    grid = ParallelGrid(tp=tp, pp=pp, dp=dp, ep=ep)
    cfg = moe_config(style)
    chunks = build_model_chunks(cfg, grid, 1, seed=SEED, sequence_parallel=sp)
    buffer = GradientBuffer(chunks, grid, zero_stage=stage, num_microbatches=M)
    optimizer = ShardedAdamW(buffer, **OPTIM, grad_clip=0.0)  # for the norm only
    set_aux_loss_scale(chunks, 1.0 / M)
    forward_backward = get_forward_backward_func(SimpleNamespace(pp=pp), schedule)
    loss = forward_backward(chunks, rank_micro_batches(grid.dp_rank, cfg), grid) / M
    finalize_grads(buffer)
    norm, _, _ = read_norm(optimizer.clip_grads())
    comm.all_reduce(loss, grid.pp_group)  # only the last stage holds it
    comm.all_reduce(loss, grid.dp_group)
    return {"loss": float(loss) / dp, "norm": norm,
            "grads": flat_pieces(buffer, buffer.local_grad_shards(), grid),
            "expert_buckets": sorted({b.group_size for b in buffer.buckets
                                      if param_info(b.params[0]).expert})}


def _every_real_layout() -> dict:
    return {layout: _real_layout(*layout) for layout in REAL_LAYOUTS}


def test_moe_loss_and_every_gradient_equal_one_process():
    """Router, experts, shared expert and dense parts, at ep=2 and 4 with dp, ZeRO-1 and 3,
    tp=2 + SP (both styles: fc1 split along dims 1 and 2), pp=2 (1F1B, and ZB-H1 under
    ZeRO-3): the loss, every gradient
    after finalize_grads (at its global place: tp slice, experts at their global index) and
    the global norm equal the single process's."""
    results = run_distributed(_every_real_layout, world_size=4, timeout_s=300)
    references = {(style, dp): real_reference(style, dp) for style in ("llama", "gpt")
                  for dp in (2, 4)}
    for layout in REAL_LAYOUTS:
        style, tp, pp, dp, ep, stage, sp, schedule = layout
        ref = references[(style, dp)]
        shapes = {name: tuple(g.shape) for name, g in ref["grads"].items()}
        per_rank = [r[layout] for r in results]
        for r in per_rank:
            assert abs(r["loss"] - ref["loss"]) <= 1e-5 * ref["loss"], (layout, r["loss"])
            assert abs(r["norm"] - ref["norm"]) <= 1e-5 * ref["norm"], (layout, r["norm"])
            assert r["expert_buckets"] == [dp // ep], layout
        grads = assemble([p for r in per_rank for p in r["grads"]], shapes, atol=1e-6)
        kinds = {"router", "experts", "shared", "mlp.fc1", "attention", "embedding"}
        assert {kind for kind in kinds for name in shapes if kind in name} == kinds
        for name, expected in ref["grads"].items():
            error = float((grads[name] - expected).norm() / expected.norm())
            assert error < 1e-5, (layout, name, error)
