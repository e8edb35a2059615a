"""The planner and the FLOPs counter for a mixture of experts (model.moe, parallel.ep), against
closed-form counts, transformers' Mixtral and the real model:

  - Mixtral 8x7B's total and active parameters: transformers' MixtralForCausalLM (built on
    the meta device) plus what nanomt's full multi-head attention adds over its grouped K, V;
  - parameters per rank: E/ep experts per MoE layer, split over tp, every `every` layers; the
    dense part unchanged; equal to the real model's shard built on the meta device at
    tp x ep x pp;
  - the all-to-all bytes the real layer hands to comm on 2 gloo ranks (ep = 2) in a forward
    and backward equal the planner's count;
  - model state: the experts' ZeRO shards over dp cp / ep ranks, the rest over dp cp;
  - all-to-all bytes per step: 4 e T top_k h per MoE layer and micro-batch (6 with the
    recomputed forward), 0 at ep = 1; the step-time model's ep term is those all-to-alls;
  - FLOPs count the active experts and the router, not the total;
  - --search offers ep (divisors of dp cp that divide E) for MoE models only, and only
    layouts training accepts (tp dividing the experts' ffn too);
  - what the routing keeps for backward against the memory meter.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nanomt.config import model_config
from nanomt.flops import flops_per_iteration
from nanomt.model import GPT, ModelConfig
from nanomt.model.config import MoEConfig
from nanomt.planner import PlanInputs, make_plan, meta_shard_params
from nanomt.planner.params import params_on_pipeline_rank
from nanomt.planner.search import search
from nanomt.planner.step_time import Machine, all_to_all_s, optimizer_s, step_time
from nanomt.testing import compose_config, run_distributed

A100 = Machine()


def with_moe(cfg: ModelConfig, num_experts: int, top_k: int, ffn_hidden_size: int,
             every: int = 1, shared_experts: int = 0) -> ModelConfig:
    return replace(cfg, moe=MoEConfig(num_experts=num_experts, top_k=top_k,
                                      ffn_hidden_size=ffn_hidden_size, every=every,
                                      shared_experts=shared_experts))


def mixtral_8x7b() -> ModelConfig:
    """model=mixtral_8x7b: HF's config.json, but num_key_value_heads = num_heads = 32."""
    return model_config(compose_config(["model=mixtral_8x7b"]))


# Mixtral 8x7B, as transformers counts it (grouped-query attention: 8 K, V heads of 128)
HF_TOTAL, HF_ACTIVE = 46_702_792_704, 12_879_925_248
# nanomt's attention has 32 K and 32 V heads: 2 h (h - h/4) more weights per layer
MHA_EXTRA = 32 * 2 * 4096 * (4096 - 1024)


def test_mixtral_8x7b_total_and_active_parameters():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig())  # 8x7B defaults
    assert sum(p.numel() for p in hf.parameters()) == HF_TOTAL
    one_expert = 3 * 14336 * 4096
    assert HF_TOTAL - HF_ACTIVE == 32 * (8 - 2) * one_expert
    cfg = mixtral_8x7b()
    assert cfg.num_parameters() == HF_TOTAL + MHA_EXTRA
    assert cfg.num_parameters(active=True) == HF_ACTIVE + MHA_EXTRA
    plan = make_plan(cfg, PlanInputs(tp=1, pp=1, dp=1))
    assert (plan.params_total, plan.params_active) == (HF_TOTAL + MHA_EXTRA,
                                                       HF_ACTIVE + MHA_EXTRA)
    # one rank holding everything: the planner's count, the vocabulary padded to 32,000 already
    assert plan.params_per_rank == plan.params_total


def test_expert_params_per_rank_are_e_over_ep_split_over_tp():
    cfg = with_moe(ModelConfig(style="gpt", num_layers=4, hidden_size=64, num_heads=4,
                               seq_len=32, vocab_size=256), num_experts=8, top_k=2,
                   ffn_hidden_size=96, every=2, shared_experts=1)
    dense = ModelConfig(style="gpt", num_layers=4, hidden_size=64, num_heads=4, seq_len=32,
                        vocab_size=256)
    h, f_e, tp, ep = 64, 96, 2, 4
    experts = 8 // ep * 2 * f_e * h // tp          # GeLU: fc1 and fc2, no biases
    shared = 2 * f_e * h // tp + f_e // tp + h     # a dense MLP of width 1 x f_e, biases
    dense_mlp = 2 * 256 * h // tp + 256 // tp + h  # what layer 1 (and 3) replace
    for pp_rank in range(2):  # layers 2r, 2r+1: 2r+1 is an MoE layer
        assert params_on_pipeline_rank(cfg, tp, 2, 1, pp_rank, ep) == \
            params_on_pipeline_rank(dense, tp, 2, 1, pp_rank) - dense_mlp + 8 * h + experts \
            + shared
        assert params_on_pipeline_rank(cfg, tp, 2, 1, pp_rank, ep, experts_only=True) == experts


def test_expert_state_is_sharded_over_expert_dp():
    cfg = mixtral_8x7b()
    x = PlanInputs(tp=2, pp=4, dp=8, ep=8, zero_stage=1, micro_batch=1, global_batch=64)
    plan = make_plan(cfg, x)
    layers, experts_per_layer = 32 // 4, 8 // 8
    experts = layers * experts_per_layer * 3 * 14336 * 4096 // 2  # split over tp = 2
    assert plan.expert_params_per_rank == experts and x.expert_dp == 1
    dense = plan.params_per_rank - experts
    assert plan.bytes_per_gpu["optimizer"] == 12 * dense / 8 + 12 * experts / 1
    assert plan.bytes_per_gpu["weights"] == 2 * plan.params_per_rank
    at_ep2 = make_plan(cfg, PlanInputs(tp=2, pp=4, dp=8, ep=2, zero_stage=1, micro_batch=1,
                                       global_batch=64))
    assert at_ep2.expert_params_per_rank == 4 * experts  # 4 experts a layer, over 4 ranks
    assert at_ep2.bytes_per_gpu["optimizer"] == pytest.approx(
        plan.bytes_per_gpu["optimizer"])  # ZeRO-1: E/(ep (dp/ep)) = E/dp experts' state
    assert at_ep2.bytes_per_gpu["weights"] > plan.bytes_per_gpu["weights"]
    # AdamW touches its dense shard (1/8) and its whole experts' state (expert_dp = 1)
    assert optimizer_s(x, plan.params_per_rank, A100, experts) == pytest.approx(
        2 * (2 + 4 + 12) * (dense / 8 + experts) / 1500e9)


def test_all_to_all_bytes_and_the_ep_term():
    cfg = mixtral_8x7b()
    x = PlanInputs(tp=1, pp=2, dp=4, ep=4, micro_batch=2, global_batch=32, precision="bf16")
    plan = make_plan(cfg, x)
    m, layers, tokens = 4, 16, 2 * 4096
    one, counts = 2 * tokens * 2 * 4096, 8 * 8  # e T top_k h; E int64 per forward
    assert plan.all_to_all_bytes_per_step == m * layers * (4 * one + counts)
    full = make_plan(cfg, replace(x, recompute="full"))
    assert full.all_to_all_bytes_per_step == m * layers * (6 * one + 2 * counts)
    assert make_plan(cfg, replace(x, ep=1)).all_to_all_bytes_per_step == 0
    t = step_time(cfg, x, plan.params_per_rank, plan.hardware_flops_per_iteration,
                  plan.model_flops_per_iteration, A100, plan.expert_params_per_rank).terms
    exchange = 3 / 4 * one / 200e9 + 3 * 3e-6  # 4 consecutive ranks: NVLink
    assert all_to_all_s(one, 4, 200.0, A100) == pytest.approx(exchange)
    assert t["ep"] == pytest.approx(m * layers * 4 * exchange)


def test_flops_count_the_active_experts_and_the_router():
    B, s, l, h, E = 8, 128, 4, 64, 8
    dense = ModelConfig(num_layers=l, hidden_size=h, num_heads=4, seq_len=s, vocab_size=256)
    # top-1 of 8 experts as wide as the dense MLP: the dense count plus the router's 2 h E
    moe = with_moe(ModelConfig(num_layers=l, hidden_size=h, num_heads=4, seq_len=s,
                               vocab_size=256), num_experts=E, top_k=1, ffn_hidden_size=4 * h)
    for full in (False, True):
        passes = 4 if full else 3
        assert flops_per_iteration(moe, B, full_recompute=full) == pytest.approx(
            flops_per_iteration(dense, B, full_recompute=full) + passes * B * s * l * 2 * h * E)
    # every 2nd layer, top-2 SwiGLU experts of f_e and one shared: per MoE layer and token
    # forward 2 h E + 2 x 3 h f_e x (2 + 1) instead of 16 h^2
    f_e = 96
    llama = with_moe(ModelConfig(style="llama", num_layers=l, hidden_size=h, num_heads=4,
                                 seq_len=s, vocab_size=256), num_experts=E, top_k=2,
                     ffn_hidden_size=f_e, every=2, shared_experts=1)
    base = ModelConfig(style="llama", num_layers=l, hidden_size=h, num_heads=4, seq_len=s,
                       vocab_size=256)
    assert flops_per_iteration(llama, B) == pytest.approx(
        flops_per_iteration(base, B) + 3 * B * s * 2 * (2 * h * E + 6 * h * f_e * 3 - 16 * h * h))


def test_search_offers_expert_parallelism_for_moe_models_only():
    cfg = mixtral_8x7b()
    base = PlanInputs(tp=1, pp=1, dp=16, global_batch=64, precision="bf16",
                      gpu_memory_gb=80.0)
    result = search(cfg, base, 16, A100)
    eps = {c.plan.inputs.ep for c in result.ranked}
    assert eps and eps <= {1, 2, 4, 8} and max(eps) > 1
    for c in result.ranked:
        x = c.plan.inputs
        assert (x.dp * x.cp) % x.ep == 0 and 8 % x.ep == 0
    best = result.ranked[0]
    assert best.time.terms["ep"] > 0 or best.plan.inputs.ep == 1
    dense = ModelConfig(style="llama", num_layers=8, hidden_size=1024, num_heads=16,
                        seq_len=1024, vocab_size=32000)
    assert {c.plan.inputs.ep for c in search(dense, PlanInputs(
        tp=1, pp=1, dp=8, global_batch=32, precision="bf16"), 8, A100).ranked} == {1}


SHARDED = {  # name: (model, tp, pp, v, ep, sequence parallel)
    "llama tp2 ep2 pp2 shared": (with_moe(ModelConfig(
        style="llama", num_layers=4, hidden_size=32, num_heads=4, seq_len=16, vocab_size=100),
        num_experts=4, top_k=2, ffn_hidden_size=24, every=2, shared_experts=1), 2, 2, 1, 2,
        True),
    "gpt ep4 pp2 v2": (with_moe(ModelConfig(
        style="gpt", num_layers=4, hidden_size=32, num_heads=4, seq_len=16, vocab_size=100),
        num_experts=8, top_k=1, ffn_hidden_size=40), 1, 2, 2, 4, False),
}


@pytest.mark.parametrize("name", sorted(SHARDED))
def test_params_per_rank_equal_the_meta_device_shard(name):
    cfg, tp, pp, v, ep, sp = SHARDED[name]
    for pp_rank in range(pp):
        for tp_rank, ep_rank in {(0, 0), (tp - 1, ep - 1)}:
            assert params_on_pipeline_rank(cfg, tp, pp, v, pp_rank, ep) == meta_shard_params(
                cfg, tp, pp, v, pp_rank, tp_rank, sp, ep, ep_rank), (pp_rank, tp_rank, ep_rank)
            assert params_on_pipeline_rank(cfg, tp, pp, v, pp_rank, ep, experts_only=True) > 0


COUNTED = with_moe(ModelConfig(style="llama", num_layers=3, hidden_size=16, num_heads=2,
                               seq_len=8, vocab_size=64), num_experts=4, top_k=2,
                   ffn_hidden_size=24, every=2)  # layer 1 only


def _count_all_to_all_bytes(micro_batches: int) -> int:
    """One forward + backward per micro-batch of b = 2 sequences on this rank (ep = dp = 2)."""
    from comm_counting import traffic_log
    from nanomt.parallel.grid import ParallelGrid

    grid = ParallelGrid(dp=2, ep=2)
    model = GPT(COUNTED, grid, seed=5)
    generator = torch.Generator().manual_seed(grid.rank)
    with traffic_log() as log:
        for _ in range(micro_batches):
            tokens = torch.randint(0, 64, (2, 8), generator=generator)
            model(tokens, tokens).mean().backward()
    return sum(r.nbytes for r in log if r.kind == "all_to_all")


def test_counted_all_to_all_bytes_equal_the_planners():
    """Rank by rank the bytes depend on the routing (a rank sends its T k rows and returns the
    rows it received); over the ep group they add up to ep x the planner's per-rank count."""
    counted = run_distributed(_count_all_to_all_bytes, world_size=2, args=(3,), timeout_s=300)
    x = PlanInputs(tp=1, pp=1, dp=2, ep=2, micro_batch=2, global_batch=12, precision="fp32")
    assert x.num_microbatches == 3
    plan = make_plan(COUNTED, x)
    T, k, h, E = 2 * 8, 2, 16, 4
    counts = 8 * E  # int64 per expert, once per forward
    assert plan.all_to_all_bytes_per_step == 3 * 1 * (4 * 4 * T * k * h + counts)
    assert sum(counted) == 2 * plan.all_to_all_bytes_per_step


METERED = ["model.hidden_size=32", "model.seq_len=256", "train.global_batch_size=4",
           "train.micro_batch_size=4", "train.steps=1", "train.eval_interval=0",
           "train.eval_batches=1", "train.progress_bar=false", "checkpoint.interval=0",
           "logging.wandb.mode=disabled", "train.measure_memory=true"]
# the same attention, and an MLP as wide as the MoE layer's active experts (k f_e = 128)
METERED_MODELS = {"moe": ["model=moe_tiny", "model.moe.ffn_hidden_size=64"],
                  "dense": ["model=llama_tiny", "model.ffn_hidden_size=128"]}


def _train_metered(run_dir: str) -> None:
    from pathlib import Path

    from nanomt.train import run

    for name, overrides in METERED_MODELS.items():
        run(compose_config(METERED + overrides), Path(run_dir) / name)


def test_what_routing_keeps_matches_the_memory_meter(tmp_path):
    """s b >> h (tests/test_planner_memory.py's reason). What an MoE layer keeps beyond a dense
    layer of its active width (estimate.routing_bytes) against the meter's difference between
    the two models; the llama layer's own bytes are not this test's (docs/moe.md)."""
    import json

    from nanomt.planner.from_config import plan_inputs

    run_distributed(_train_metered, world_size=1, args=(str(tmp_path),), timeout_s=600)
    measured, planned = {}, {}
    for name, overrides in METERED_MODELS.items():
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        measured[name] = summary["memory_per_rank"][0]["peak_activations"]
        cfg = compose_config(METERED + overrides + ["+plan=default"])
        cfg.parallel.dp = 1
        planned[name] = make_plan(*plan_inputs(cfg)).bytes_per_gpu["activations"]
    routing = 4 * (2 * 4 * 1024 * 2 * 32 + 8 * 1024 * 4 + 32 * 1024 * 2)  # 4 layers, T = 1024
    assert planned["moe"] - planned["dense"] == routing
    assert routing == pytest.approx(measured["moe"] - measured["dense"], rel=0.1)


def test_the_search_offers_only_expert_layouts_training_accepts():
    """Every (tp, ep) the search ranks for an MoE model passes training's own checks (E % ep,
    expert ffn % tp, ep | dp cp) through its launch command, which selects that layout."""
    import shlex

    from nanomt.planner.from_config import plan_inputs, search_inputs
    from nanomt.planner.search import same_layout
    from nanomt.planner.search_report import launch_command

    overrides = ["+plan=default", "model=moe_tiny", "model.moe.ffn_hidden_size=18",
                 "plan.gpus=8", "train.global_batch_size=32"]
    model, base, _, gpus = search_inputs(compose_config(overrides))
    ranked = [c.plan.inputs for c in search(model, base, gpus, A100).ranked]
    # 4 heads: tp 1, 2 or 4, but 4 does not divide the experts' 18; 4 experts: ep 1, 2 or 4
    assert {(x.tp, x.ep) for x in ranked} == {(tp, ep) for tp in (1, 2) for ep in (1, 2, 4)}
    for x in {(x.tp, x.ep, x.dp, x.cp, x.pp): x for x in ranked}.values():
        words = shlex.split(launch_command(x, 8, overrides[1:3]))
        _, chosen = plan_inputs(compose_config(["+plan=default"] + words[5:]))  # checks it
        assert same_layout(chosen, x)
