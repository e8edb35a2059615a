"""The planner's schedule formulas (nanomt.planner.schedule_costs) against their closed forms,
and the zero-bubble schedules in the plan, the table and the search:

  - bubble: GPipe and 1F1B (p-1)/m, interleaved (p-1)/(v m), ZB-H1 (p-1)(T_F + T_B - T_W) /
    (m (T_F + T_B + T_W)), a third of 1F1B's at T_F = T_B = T_W and half of it under full
    recompute (T_B doubled), nanomt's ZB-V half ZB-H1's, (p-1)/(6m) at equal times;
  - activations: walking each rank's real order (a zero-bubble micro-batch held until its W)
    reaches the closed-form peak on the first rank, and ZB-H1 holds 1F1B's p micro-batches;
    the bytes a pending W keeps are its linears' X and dY, formula worked by hand;
  - ZB-V's V placement: rank 0 holds the embedding and the head (parameters equal the
    meta-device shard built by training's code), the head's bytes counted there;
  - MT-NLG 530B (tp 8, pp 35, dp 8): the table says what ZB-H1 saves per step, the bubble
    term's difference; the search considers ZB-H1 and ranks the paper's layout under it first;
    ZB-V is searched and printed for an untied model (the config refuses it tied).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from nanomt.memory import activation_bytes_per_layer
from nanomt.model import ModelConfig
from nanomt.planner import PlanInputs, make_plan
from nanomt.planner.estimate import (backward_working_bytes, chunk_activation_bytes,
                                     in_flight_counts, logits_bytes, pending_weight_grad_bytes)
from nanomt.planner.schedule_costs import (PassTimes, bubble_fraction, pass_times,
                                           peak_passes_in_flight, peak_stage_microbatches)
from nanomt.planner.meta_shard import meta_shard_params
from nanomt.planner.params import params_on_pipeline_rank
from nanomt.planner.search import search
from nanomt.planner.step_time import Machine, step_time
from planner_tool import plan_tool

MTNLG = ModelConfig(num_layers=105, hidden_size=20480, num_heads=128, seq_len=2048,
                    vocab_size=50257)
PAPER = PlanInputs(tp=8, pp=35, dp=8, micro_batch=1, global_batch=1920, precision="bf16",
                   recompute="full", zero_stage=1)
PAPER_ARGS = ["model=mtnlg_530b", "parallel.tp=8", "parallel.pp=35", "parallel.dp=8",
              "train.global_batch_size=1920", "train.micro_batch_size=1",
              "train.precision=bf16", "train.activation_checkpointing=full",
              "parallel.zero_stage=1", "plan.meta_check=false"]
LAYOUTS = [(p, m) for p in (2, 3, 4, 8) for m in (1, p, 2 * p, 3 * p, 8 * p)]


@pytest.mark.parametrize("p,m", LAYOUTS)
def test_bubbles_equal_their_closed_forms(p, m):
    assert bubble_fraction("gpipe", p, m) == pytest.approx((p - 1) / m)
    assert bubble_fraction("1f1b", p, m) == pytest.approx((p - 1) / m)
    assert bubble_fraction("1f1b", p, m, 2) == pytest.approx((p - 1) / (2 * m))
    assert bubble_fraction("zb_h1", p, m) == pytest.approx((p - 1) / (3 * m))
    assert bubble_fraction("zb_h1", p, m) == pytest.approx(bubble_fraction("1f1b", p, m) / 3)
    assert bubble_fraction("zb_h1", p, m, 1, pass_times("full")) == pytest.approx(
        (p - 1) / (2 * m))
    assert bubble_fraction("zbv", p, m, 2) == pytest.approx((p - 1) / (6 * m))
    # away from equal times: ZB-H1 (p-1)(F + B - W) / (m (F + B + W)), ZB-V half of it
    slow_w = PassTimes(forward=1.0, input_grad=1.0, weight_grad=0.5)
    assert bubble_fraction("zb_h1", p, m, 1, slow_w) == pytest.approx((p - 1) * 1.5 / (2.5 * m))
    assert bubble_fraction("zbv", p, m, 2, slow_w) == pytest.approx((p - 1) * 1.5 / (5 * m))
    assert bubble_fraction("1f1b", 1, m) == bubble_fraction("zb_h1", 1, m) == 0.0


@pytest.mark.parametrize("p,m", LAYOUTS)
def test_the_walk_reaches_the_closed_form_peak(p, m):
    """The first rank's most passes in flight (F run, B or under ZB-H1 W not yet) equal
    peak_passes_in_flight, and ZB-H1's most on any rank equal 1F1B's first rank: p."""
    cases = [("gpipe", 1), ("1f1b", 1), ("zb_h1", 1), ("zbv", 2)] + (
        [("1f1b", 2)] if m % p == 0 else [])
    for schedule, v in cases:
        # ZB-V: below 2p - 1 micro-batches the most sit on the V's turn, rank p-1, not rank 0
        ranks = range(p) if schedule == "zbv" else [0]
        walked = max(n + w for r in ranks for n, _, w, _ in in_flight_counts(schedule, p, r, m, v))
        assert walked == peak_passes_in_flight(schedule, p, m, v), (schedule, v)
    assert peak_stage_microbatches("1f1b", p, m, 2) == min(p + (p - 1) / 2, m)
    zb_h1 = max(n + w for r in range(p) for n, _, w, _ in in_flight_counts("zb_h1", p, r, m, 1))
    zbv = max(n + w for r in range(p) for n, _, w, _ in in_flight_counts("zbv", p, r, m, 2))
    assert zb_h1 == zbv / 2 == peak_stage_microbatches("1f1b", p, m) == min(p, m)
    assert peak_stage_microbatches("zbv", p, m, 2) == min(p, m)


def test_pending_weight_gradient_bytes_by_hand():
    """Per layer, e s b times: X of QKV and fc1 (h each, /t under SP), of the attention out
    and fc2 (h/t, f/t); dY of QKV and fc1 (3h/t, f/t), of the two row linears (h, whole)."""
    cfg = ModelConfig(num_layers=8, hidden_size=64, num_heads=4, seq_len=32, vocab_size=256)
    s, b, h, f = 32, 2, 64, 256
    for tp, sp in ((1, False), (2, False), (2, True)):
        x = PlanInputs(tp=tp, pp=2, dp=1, micro_batch=b, global_batch=8, precision="fp32",
                       sequence_parallel=sp, schedule="zb_h1")
        t_sp = tp if sp else 1
        per_layer = 4 * s * b * (2 * h / t_sp + (h + f) / tp + (3 * h + f) / tp + 2 * h)
        assert pending_weight_grad_bytes(cfg, x, 0, 2) == pytest.approx(4 * per_layer)
        head = 4 * s * b * (h / t_sp + cfg.padded_vocab_size(tp) / tp)
        assert pending_weight_grad_bytes(cfg, x, 1, 2) == pytest.approx(4 * per_layer + head)
    # at tp = 1 a pending W holds 16 e s b h a layer, less than the 34 s b h (bf16) it kept
    kept = activation_bytes_per_layer(s, b, h, 4, tp=1, sequence_parallel=False,
                                      recompute="none", dropout=False, flash=True,
                                      bytes_per_element=2, ffn_hidden=f)
    assert 2 * 16 * s * b * h < kept


def test_zero_bubble_plan_against_1f1bs_activations():
    """At tp = 1 without recompute ZB-H1 holds 1F1B's p micro-batches. With a head small
    beside a stage's layers its peak is within 10% of 1F1B's (the issue's bound); with a
    wide head it is the last rank's, that holds the W of its last p micro-batches back
    (zero_bubble.py), each with the head's X and dY, s b (h + V_padded) e bytes: its peak is
    the last F's kept bytes beside p-1 such W, or p of them."""
    x = PlanInputs(tp=1, pp=4, dp=1, micro_batch=2, global_batch=32, precision="bf16")
    small_head = ModelConfig(num_layers=8, hidden_size=512, num_heads=8, seq_len=256,
                             vocab_size=128)
    ours, zb = make_plan(small_head, x), make_plan(small_head, replace(x, schedule="zb_h1"))
    assert zb.microbatches_in_flight == ours.microbatches_in_flight == 4
    assert zb.bytes_per_gpu["activations"] == pytest.approx(ours.bytes_per_gpu["activations"],
                                                            rel=0.10)
    assert zb.bubble_fraction == pytest.approx(3 / (3 * 16))
    wide_head = replace(small_head, hidden_size=256, vocab_size=4096)
    zx = replace(x, schedule="zb_h1")
    zb = make_plan(wide_head, zx)
    held_back = pending_weight_grad_bytes(wide_head, zx, 3, 4)
    kept = chunk_activation_bytes(wide_head, zx, 3, 4)
    assert zb.activation_pp_rank == 3
    assert zb.bytes_per_gpu["activations"] == pytest.approx(
        max(kept + 3 * held_back, 4 * held_back) + logits_bytes(wide_head, zx)
        + backward_working_bytes(wide_head, zx))
    assert zb.bytes_per_gpu["activations"] > 1.1 * make_plan(wide_head, x).bytes_per_gpu[
        "activations"]


def test_the_530b_table_says_what_zb_h1_saves(tmp_path, capsys):
    """The saving is the bubble term's difference: busy x ((p-1)/m - (p-1)/(2m)) with full
    recompute's 1 : 2 : 1 passes, busy the pipeline rank's compute and in-line traffic."""
    out = tmp_path / "plan.json"
    assert plan_tool().main(PAPER_ARGS + [f"plan.json_out={out}"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines()
           if line.startswith("with parallel.schedule=zb_h1")]
    assert len(row) == 1
    cfg_plan = make_plan(MTNLG, PAPER)
    terms = step_time(MTNLG, PAPER, cfg_plan.params_per_rank,
                      cfg_plan.hardware_flops_per_iteration,
                      cfg_plan.model_flops_per_iteration, Machine()).terms
    busy = sum(terms[k] for k in ("compute", "recompute", "tp", "cp", "pp"))
    saved = busy * (34 / 240 - 34 / 480)
    total = sum(terms.values())
    assert terms["bubble"] == pytest.approx(busy * 34 / 240)
    assert f"saves {saved:,.2f} s per step ({100 * saved / total:.1f}%)" in row[0]
    assert json.loads(out.read_text())["bubble_formula"] == "(p-1)/m"


def test_the_search_considers_zb_h1_and_prefers_it_to_1f1b():
    result = search(MTNLG, PAPER, 2240, Machine())
    assert any(c.plan.inputs.schedule == "zb_h1" for c in result.ranked)
    paper_zb = replace(PAPER, schedule="zb_h1")
    assert result.rank_of(paper_zb) < result.rank_of(PAPER)


UNTIED = ModelConfig(num_layers=8, hidden_size=64, num_heads=4, seq_len=64, vocab_size=256,
                     tie_embeddings=False)


def test_zbv_places_the_embedding_and_the_head_on_rank_0():
    """Rank 0 holds chunks 0 and 2p-1: the plan's largest rank, its count the meta shard's, and
    the head's logits and X, dY counted in its activations."""
    x = PlanInputs(tp=2, pp=2, dp=1, virtual_stages=2, schedule="zbv", micro_batch=2,
                   global_batch=8, precision="fp32")
    plan = make_plan(UNTIED, x)
    assert plan.largest_pp_rank == 0
    for rank in (0, 1):
        assert params_on_pipeline_rank(UNTIED, 2, 2, 2, rank, v_shape=True) == \
            meta_shard_params(UNTIED, 2, 2, 2, rank, schedule="zbv")
    assert plan.activation_pp_rank == 0 and plan.microbatches_in_flight == 4
    assert plan.bubble_fraction == pytest.approx(1 / 24)
    last_chunk_counts = [k + wk for _, k, _, wk in in_flight_counts("zbv", 2, 0, 4, 2)]
    assert max(last_chunk_counts) >= 1
    assert all(k == wk == 0 for _, k, _, wk in in_flight_counts("zbv", 2, 1, 4, 2))


def test_zbv_in_the_search_and_the_table(capsys):
    base = PlanInputs(tp=1, pp=1, dp=8, micro_batch=1, global_batch=32, precision="bf16")
    result = search(UNTIED, base, 8, Machine())
    assert any(c.plan.inputs.schedule == "zbv" and c.plan.inputs.virtual_stages == 2
               for c in result.ranked)
    assert not any(c.plan.inputs.schedule == "zbv"
                   for c in search(replace(UNTIED, tie_embeddings=True), base, 8,
                                   Machine()).ranked)
    args = ["model=tiny", "model.tie_embeddings=false", "parallel.pp=2", "parallel.dp=1",
            "train.global_batch_size=8", "train.micro_batch_size=1"]
    plan_tool().main(args)
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("with parallel.schedule=")]
    assert [row.split()[1] for row in rows] == ["parallel.schedule=zb_h1", "parallel.schedule=zbv"]
    assert f"bubble {1 / 48:.4f}" in rows[1]  # (p-1)/(6m), m = 8
