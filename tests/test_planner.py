"""The planner (nanomt.planner, tools/plan.py) against the real model, the paper and a real run:

  - parameters per rank equal those of the rank's shard of the real model built on the meta
    device, for several layouts (MT-NLG 530B at tp=8 x pp=35 among them, GPT and llama,
    interleaved stages);
  - the paper's setting: about 529.6B parameters, F of about 16,926 PFLOP per iteration, bubble
    (p-1)/m, and 126 / 121 / 113 TFLOP/s per GPU from the paper's iteration times;
  - context parallelism divides the activations and shards the state over dp x cp.

Bytes per GPU against real runs (six layouts, ZeRO-1 and ZeRO-3 among them) are
tests/test_planner_memory.py's; the step-time model and the search tests/test_plan_search.py's.
"""

from __future__ import annotations

import json

import pytest

from nanomt.model import ModelConfig
from nanomt.planner import PlanInputs, make_plan, meta_shard_params, params_on_pipeline_rank
from planner_tool import plan_tool


MTNLG = ModelConfig(num_layers=105, hidden_size=20480, num_heads=128, seq_len=2048,
                    vocab_size=50257)
PAPER = ["model=mtnlg_530b", "parallel.tp=8", "parallel.pp=35", "parallel.dp=8",
         "train.global_batch_size=1920", "train.micro_batch_size=1"]


LAYOUTS = {  # name: (model, tp, pp, virtual stages, sequence parallel)
    "gpt tp2 pp2": (ModelConfig(num_layers=4, hidden_size=64, num_heads=4, seq_len=64), 2, 2, 1,
                    False),
    "gpt tp4 pp1 sp": (ModelConfig(num_layers=2, hidden_size=64, num_heads=4, seq_len=64,
                                   vocab_size=300), 4, 1, 1, True),
    "llama tp2 pp2 v2": (ModelConfig(num_layers=8, hidden_size=64, num_heads=4, seq_len=64,
                                     style="llama"), 2, 2, 2, False),
    "gpt tp1 pp3": (ModelConfig(num_layers=6, hidden_size=32, num_heads=2, seq_len=32), 1, 3,
                    1, False),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_params_per_rank_equal_the_meta_device_shard(name):
    cfg, tp, pp, v, sp = LAYOUTS[name]
    for pp_rank in range(pp):
        for tp_rank in {0, tp - 1}:
            assert params_on_pipeline_rank(cfg, tp, pp, v, pp_rank) == meta_shard_params(
                cfg, tp, pp, v, pp_rank, tp_rank, sequence_parallel=sp), (pp_rank, tp_rank)


def test_mtnlg_largest_and_last_rank_equal_the_meta_device_shard():
    plan = make_plan(MTNLG, PlanInputs(tp=8, pp=35, dp=8, micro_batch=1, global_batch=1920))
    assert plan.largest_pp_rank == 0  # the embedding and the positions: 2,058,580,480
    assert plan.params_per_rank == meta_shard_params(MTNLG, 8, 35, 1, 0) == 2_058_580_480
    assert params_on_pipeline_rank(MTNLG, 8, 35, 1, 34) == meta_shard_params(MTNLG, 8, 35, 1, 34)


def test_the_papers_setting(tmp_path, capsys):
    tool = plan_tool()
    runs = {}
    for dp, seconds in ((8, 60.1), (10, 50.2), (12, 44.4)):  # 280, 350, 420 DGX nodes
        out = tmp_path / f"dp{dp}.json"
        code = tool.main(PAPER[:3] + [f"parallel.dp={dp}"] + PAPER[4:] + [
            f"plan.iteration_time_s={seconds}", f"plan.json_out={out}"])
        runs[dp] = (code, json.loads(out.read_text()))
    code, plan = runs[8]
    assert plan["params_total"] / 1e9 == pytest.approx(529.6, abs=0.05)
    assert plan["meta_shard_params"] == plan["params_per_rank"] == 2_058_580_480
    # V padded to 50,304: 16,926.0 PFLOP (16,926.4 at the paper's 51,200)
    assert plan["flops_per_iteration"] / 1e15 == pytest.approx(16926, rel=1e-4)
    assert plan["bubble_fraction"] == pytest.approx(34 / 240)
    # the paper's 126 / 121 / 113: 125.7, 120.4 and 113.5 by its own formula and times
    assert [runs[dp][1]["achieved_tflops_per_gpu"] for dp in (8, 10, 12)] == \
        pytest.approx([126, 121, 113], rel=0.01)
    # fp32 and no recompute (the training defaults) cannot hold 35 micro-batches of 3 layers
    assert code == 1 and not plan["fits"]
    assert any("train.activation_checkpointing=full" in tip for tip in plan["advice"])
    activations = plan["bytes_per_gpu"]["activations"]
    assert plan["microbatches_in_flight"] == 35 and activations > 80 * 2**30
    assert "meta-device shard" in capsys.readouterr().out

    # as the paper ran it: bf16, full recompute; it fits an 80 GB A100
    out = tmp_path / "bf16.json"
    assert tool.main(PAPER + ["train.precision=bf16", "train.activation_checkpointing=full",
                              "plan.meta_check=false", f"plan.json_out={out}"]) == 0
    plan = json.loads(out.read_text())
    psi = 2_058_580_480
    assert plan["bytes_per_gpu"]["weights"] == 2 * psi
    assert plan["bytes_per_gpu"]["optimizer"] == 12 * psi
    # full recompute keeps each layer's input, 2 s b h bytes, times 3 layers times 35 in flight
    layer_inputs = 35 * 3 * 2 * 2048 * 20480
    assert layer_inputs < plan["bytes_per_gpu"]["activations"] < 1.1 * layer_inputs
    assert plan["step_time_s"] == pytest.approx(plan["flops_per_iteration"] / (2240 * 126e12))
    assert plan["tokens_per_s"] == pytest.approx(1920 * 2048 / plan["step_time_s"])


def test_context_parallelism_divides_activations_and_shards_state_over_dp_times_cp():
    """A cp rank holds s/cp tokens: with flash attention's no-score-matrix terms every
    activation term is linear in s, so the bytes halve at cp=2; ZeRO shards over dp x cp."""
    cfg = ModelConfig(num_layers=4, hidden_size=256, num_heads=8, seq_len=4096, vocab_size=512)
    base = dict(tp=2, pp=2, micro_batch=1, global_batch=8, zero_stage=1)
    whole, split = make_plan(cfg, PlanInputs(dp=2, **base)), make_plan(
        cfg, PlanInputs(dp=2, cp=2, **base))
    assert split.bytes_per_gpu["activations"] == pytest.approx(
        whole.bytes_per_gpu["activations"] / 2)
    wider = make_plan(cfg, PlanInputs(dp=4, **base))  # same dp x cp = 4 ranks per shard
    assert split.bytes_per_gpu["optimizer"] == wider.bytes_per_gpu["optimizer"]
    assert split.inputs.num_gpus == 16 and split.params_per_rank == whole.params_per_rank


def test_plan_tool_help_prints_its_usage(capsys):
    assert plan_tool().main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "python tools/plan.py model=mtnlg_530b parallel.tp=8 parallel.pp=35" in usage
    assert "\\\n" in usage  # the shell line continuations survive (a raw docstring)
