"""Expert parallelism computes the single-process layer: at ep=2 and ep=4, with dp, with tp=2 +
sequence parallelism and with cp=2, the MoE layer's outputs, router losses and every gradient
equal one process's, and the all-to-all bytes equal nanomt.parallel.expert_parallel's formula.

Each rank holds micro-batch d = its dp rank (its cp share, its SP shard), computes the local
mean of y * probe as its loss (the trainer's loss is a local mean too), and the gradients are
reduced by hand as the gradient buffer will: dense parameters summed over grad_sync_group,
expert parameters over expert_dp_group (their other ep ranks' tokens were computed here), each
divided by dp * cp (moe_design: the loss is the mean over the dp x cp ranks). The reference is
the whole layer in one process on the dp micro-batches, its loss their mean.
"""

from types import SimpleNamespace

import pytest
import torch

from comm_counting import traffic_log
from nanomt.model.layers import make_mlp
from nanomt.model.config import ModelConfig
from nanomt.model.moe import step_statistics
from nanomt.parallel import comm
from nanomt.parallel.blockwise_init import NormalInit
from nanomt.parallel.context_parallel import split_sequence
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.param_info import param_info
from nanomt.model.param_records import describe_parameters
from nanomt.testing import run_distributed

S, B, H, E, K = 8, 3, 16, 4, 2
LAYOUTS = {"ep4": dict(dp=4, ep=4), "ep2_dp4": dict(dp=4, ep=2),
           "ep2_tp2_sp": dict(tp=2, dp=2, ep=2, sequence_parallel=True),
           "ep2_tp2": dict(tp=2, dp=2, ep=2), "ep2_cp2": dict(cp=2, dp=2, ep=2),
           "ep4_cp2": dict(cp=2, dp=2, ep=4)}


def layer_config(style: str = "llama") -> ModelConfig:
    return ModelConfig(num_layers=1, hidden_size=H, num_heads=2, seq_len=S, vocab_size=61,
                       style=style, moe=dict(num_experts=E, top_k=K, ffn_hidden_size=8,
                                             shared_experts=1, aux_loss_coef=0.1,
                                             z_loss_coef=0.01))


class Holder(torch.nn.Module):
    """What describe_parameters reads from a model, around one MoE layer."""

    def __init__(self, cfg, grid, sequence_parallel):
        super().__init__()
        self.cfg, self.layer_range = cfg, range(1)
        self.tp_size = comm.group_size(grid.tp_group) if grid else 1
        self.ep_size = comm.group_size(grid.ep_group) if grid else 1
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        groups = (grid.tp_group, grid.ep_group, grid.cp_group) if grid else (None,) * 3
        self.mlp = make_mlp(cfg, 0, groups[0], NormalInit(0.3, 5, "mlp"),
                            NormalInit(0.3, 5, "out"), self.sequence_parallel, groups[1],
                            groups[2])
        describe_parameters(self)


def micro_batch(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + d)
    return torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)


def reference(cfg, dp: int) -> dict:
    """The whole layer on the dp micro-batches in one process: outputs, losses, counts, grads."""
    holder = Holder(cfg, None, False)
    holder.mlp.aux_loss_scale = 1.0 / dp  # the router losses of the mean over micro-batches
    out = {"y": [], "sums": [], "x_grad": []}
    for d in range(dp):
        x, probe = micro_batch(d)
        x.requires_grad_()
        before = holder.mlp.step_sums.clone() if d else 0
        y = holder.mlp(x)
        ((y * probe).mean() / dp).backward()
        out["y"].append(y.detach())
        out["sums"].append(holder.mlp.step_sums - before)
        out["x_grad"].append(x.grad)
    out["grads"] = {param_info(p).name: p.grad.clone() for p in holder.parameters()}
    return out


def my_part(t: torch.Tensor, grid: ParallelGrid, sequence_parallel: bool) -> torch.Tensor:
    """This rank's tokens of a micro-batch tensor [s, b, h]: its cp share, its SP shard."""
    t = split_sequence(t, 0, grid.cp_rank, grid.cp_size)
    if sequence_parallel:
        t = t.chunk(grid.tp_size, dim=0)[grid.tp_rank]
    return t


def reduced_grad(p: torch.nn.Parameter, grid: ParallelGrid) -> tuple[str, torch.Tensor, tuple]:
    """(name, the gradient reduced as the buffer will, the slices of the whole parameter this
    rank holds): tp partials summed; dense gradients summed over grad_sync_group, expert ones
    over expert_dp_group; both / (dp cp)."""
    info = param_info(p)
    grad = p.grad.clone()
    if info.sequence_parallel:  # partial over tp
        comm.all_reduce(grad, grid.tp_group)
    comm.all_reduce(grad, grid.expert_dp_group if info.expert else grid.grad_sync_group)
    box = info.box(tuple(p.shape), grid.tp_rank, grid.ep_rank)
    return (info.name, grad / (grid.dp_size * grid.cp_size),
            tuple(slice(a, b) for a, b in box))


def run_layout(cfg, ref: dict, tp=1, dp=1, cp=1, ep=1, sequence_parallel=False) -> dict:
    grid = ParallelGrid(tp=tp, dp=dp, cp=cp, ep=ep, timeout_s=60)
    sp = sequence_parallel and tp > 1
    holder = Holder(cfg, grid, sp)
    x_full, probe_full = micro_batch(grid.dp_rank)
    x = my_part(x_full, grid, sp).requires_grad_()
    with traffic_log() as log:
        y = holder.mlp(x)
        # under SP a shard's share of the tp group's mean (a loss equal on every tp rank)
        ((y * my_part(probe_full, grid, sp)).mean() / (tp if sp else 1)).backward()
    checks = {}
    want_y = my_part(ref["y"][grid.dp_rank], grid, sp)
    checks["y"] = (y.detach(), want_y)
    checks["sums"] = (holder.mlp.step_sums, ref["sums"][grid.dp_rank])
    # x: d(sum of every rank's loss)/dx / (dp cp) against d(mean over micro-batches)/dx
    checks["x_grad"] = (x.grad / (dp * cp), my_part(ref["x_grad"][grid.dp_rank], grid, sp))
    for p in holder.parameters():
        name, grad, box = reduced_grad(p, grid)
        checks[name] = (grad, ref["grads"][name][box])
    # the record's statistics: every rank's share summed (read_step's sum) = the batch's
    table = step_statistics([holder], cfg, (dp, cp), torch.device("cpu"))
    comm.all_reduce(table, grid.grad_sync_group)
    ref_sums = torch.stack(ref["sums"])
    checks["statistics"] = (table[0], torch.cat([ref_sums[:, :2].mean(0), ref_sums[:, 2:].sum(0)]))
    a2a = [r for r in log if r.kind == "all_to_all"]
    checks["a2a"] = {"bytes": sum(r.nbytes for r in a2a), "calls": len(a2a),
                     "groups": {r.group for r in a2a}, "ep_rank": grid.ep_rank,
                     "dp_rank": grid.dp_rank, "cp_rank": grid.cp_rank}
    return checks


def _all_layouts() -> dict:
    torch.manual_seed(0)
    cfg = layer_config()
    results = {}
    for name, layout in LAYOUTS.items():
        ref = reference(cfg, layout["dp"])
        results[name] = run_layout(cfg, ref, **layout)
        results[name]["ref_counts"] = [s[2:] for s in ref["sums"]]
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_all_layouts, world_size=4, timeout_s=600)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer_equals_one_process(ranks, layout):
    for rank, result in enumerate(ranks):
        checks = result[layout]
        names = [n for n in checks if n not in ("a2a", "ref_counts")]
        assert {"y", "sums", "x_grad", "statistics", "mlp.router.weight", "mlp.experts.fc1.weight",
                "mlp.experts.fc2.weight", "mlp.shared.fc1.weight", "mlp.shared.fc2.weight"
                } <= set(names)
        for name in names:
            got, want = checks[name]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {rank} {layout} {name}: {m}")


def a2a_bytes_formula(n_sent: int, n_received: int, hidden: int, element_bytes: int) -> int:
    """expert_parallel's docstring: counts (E int64) once, rows N + R forward and backward."""
    return 8 * E + 2 * (n_sent + n_received) * hidden * element_bytes


@pytest.mark.parametrize("layout", ["ep4", "ep2_dp4", "ep4_cp2"])
def test_all_to_all_bytes_equal_the_formula(ranks, layout):
    for result in ranks:
        checks = result[layout]
        a2a = checks["a2a"]
        ep = LAYOUTS[layout]["ep"]
        cp = LAYOUTS[layout].get("cp", 1)
        assert a2a["calls"] == 5 and a2a["groups"] == {"ep"}  # counts, 2 forward, 2 backward
        # my ep group: the ep consecutive dp x cp ranks j = dp_rank * cp + cp_rank around mine
        j = a2a["dp_rank"] * cp + a2a["cp_rank"]
        first = j - a2a["ep_rank"]
        mine = range(a2a["ep_rank"] * E // ep, (a2a["ep_rank"] + 1) * E // ep)
        # the counts of a micro-batch cover all its cp ranks: with cp > 1 they cannot say which
        # ep rank's share sent what, so check the group's total there and each rank's at cp=1
        if cp == 1:
            n_sent = S * B * K
            n_received = sum(int(checks["ref_counts"][first + i][e])
                             for i in range(ep) for e in mine)
            assert a2a["bytes"] == a2a_bytes_formula(n_sent, n_received, H, 4)
    if LAYOUTS[layout].get("cp", 1) > 1:  # summed over every rank: N and R both total T k
        total = sum(r[layout]["a2a"]["bytes"] for r in ranks)
        tokens_per_rank = S * B // LAYOUTS[layout]["cp"]
        assert total == 4 * a2a_bytes_formula(tokens_per_rank * K, tokens_per_rank * K, H, 4)


# ---- a whole GPT through the training schedules ------------------------------------------------
GPT_LAYOUTS = {"pp2_dp2_ep2": dict(pp=2, dp=2, ep=2),  # 1F1B
               "pp2_interleaved_dp2_ep2": dict(pp=2, dp=2, ep=2, virtual_stages=2),
               "tp2_sp_dp2_ep2": dict(tp=2, dp=2, ep=2),  # sequence parallel
               "dp4_ep4_recompute": dict(dp=4, ep=4)}  # full activation recompute
M = 2  # micro-batches per dp rank


def gpt_config() -> ModelConfig:
    return ModelConfig(num_layers=4, hidden_size=16, num_heads=2, seq_len=8, vocab_size=61,
                       style="llama", moe=dict(num_experts=4, top_k=2, ffn_hidden_size=8,
                                               every=2, shared_experts=1, aux_loss_coef=0.1,
                                               z_loss_coef=0.01))


def gpt_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 61, (2, 8), generator=g), torch.randint(0, 61, (2, 8), generator=g))
            for _ in range(count)]


def _gpt_layouts() -> dict:
    from nanomt.model.checkpointing import set_activation_checkpointing
    from nanomt.model.chunks import build_model_chunks
    from nanomt.model.moe import set_aux_loss_scale
    from nanomt.parallel.forward_backward import get_forward_backward_func
    cfg = gpt_config()
    results = {}
    for name, layout in GPT_LAYOUTS.items():
        layout = dict(layout)
        v = layout.pop("virtual_stages", 1)
        dp = layout["dp"]
        batches = gpt_batches(dp * M)
        (reference_model,) = build_model_chunks(cfg, None)
        set_aux_loss_scale([reference_model], 1.0 / (dp * M))
        for tokens, targets in batches:
            (reference_model(tokens, targets) / (dp * M)).backward()
        ref = {param_info(p).name: p.grad for p in reference_model.parameters()}
        grid = ParallelGrid(timeout_s=60, **layout)
        sp = grid.tp_size > 1
        chunks = build_model_chunks(cfg, grid, v, sequence_parallel=sp)
        if "recompute" in name:
            set_activation_checkpointing(chunks, "full")
        set_aux_loss_scale(chunks, 1.0 / M)
        mine = batches[grid.dp_rank * M:(grid.dp_rank + 1) * M]
        schedule = get_forward_backward_func(SimpleNamespace(pp=grid.pp_size, virtual_stages=v))
        schedule(chunks, mine, grid)
        checks = {}
        for p in (p for chunk in chunks for p in chunk.parameters()):
            param, grad, box = reduced_grad(p, grid)
            checks[param] = (grad, ref[param][box])
        table = step_statistics(chunks, cfg, (dp, 1), torch.device("cpu"))
        comm.all_reduce(table, grid.pp_group)
        comm.all_reduce(table, grid.grad_sync_group)
        # the reference's one rank: losses averaged over its dp * M micro-batches, all counts
        checks["statistics"] = (table, step_statistics([reference_model], cfg, (1, 1),
                                                       torch.device("cpu")))
        results[name] = checks
    return results


@pytest.fixture(scope="module")
def gpt_ranks() -> list[dict]:
    return run_distributed(_gpt_layouts, world_size=4, timeout_s=600)


@pytest.mark.parametrize("layout", list(GPT_LAYOUTS))
def test_gpt_gradients_equal_one_process(gpt_ranks, layout):
    """Every parameter (embedding, attention, router, experts, shared experts, dense MLPs) and
    the router statistics, with the aux losses scaled 1/m on every pipeline stage."""
    names = set()
    for rank, result in enumerate(gpt_ranks):
        for name, (got, want) in result[layout].items():
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {rank} {layout} {name}: {m}")
            names.add(name)
    for part in ("router", "experts.fc1", "experts.fc2", "shared.fc1", "layers.0.mlp.fc1",
                 "attention.qkv", "word_embedding", "statistics"):
        assert any(part in n for n in names), part
