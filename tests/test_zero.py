"""ZeRO data parallelism against the single-process AdamW run.

One spawn per layout (dp=2, dp=4, tp=2 x pp=2 x dp=2) trains the tiny model 20 steps at every ZeRO stage
through nanomt.train.run; the test compares each loss and gradient-norm trajectory with the
single-process run of the same global batch (torch.optim.AdamW, nanomt's clip_grad_norm). The
dp=2 spawn also measures the per-rank bytes of parameters, gradients and optimizer state against
ZeRO's formulas and counts the gradient reductions of a step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanomt.testing import compose_config, run_distributed

STEPS = 20
FAST = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_len=16",
        "train.global_batch_size=8", "train.micro_batch_size=1", f"train.steps={STEPS}",
        "train.eval_interval=0", "train.eval_batches=1", "train.progress_bar=false",
        "train.measure_memory=false", "optim.warmup_steps=5", "logging.wandb.mode=disabled",
        "parallel.bucket_size_mb=0.02"]  # several buckets per rank even on the tiny model
STAGES = (0, 1, 2, 3)


def trajectory(run_dir: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records], [r["grad_norm"] for r in records]


def _train_every_stage(run_root: str, layout: list[str], extra_runs: dict) -> None:
    from nanomt.train import run

    for stage in STAGES:
        run(compose_config(FAST + layout + [f"parallel.zero_stage={stage}"]),
            Path(run_root) / f"stage{stage}")
    for name, overrides in extra_runs.items():
        run(compose_config(FAST + layout + overrides), Path(run_root) / name)


def _memory_and_reduction_checks() -> dict:
    """Model-state bytes per rank at every stage (bf16 and fp32), and reductions per step."""
    from nanomt.memory import optimizer_memory
    from nanomt.model import GPT, ModelConfig
    from nanomt.parallel.grid import ParallelGrid
    from nanomt.parallel.zero import build_optimizer

    grid = ParallelGrid(1, 1, 2)
    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=16)
    out: dict = {"memory": {}}
    for precision in ("bf16", "fp32"):
        for stage in STAGES:
            cfg = compose_config(FAST + [f"parallel.zero_stage={stage}",
                                         f"train.precision={precision}"])
            model = GPT(model_cfg, grid, seed=1)
            optimizer = build_optimizer([model], cfg, grid)
            out["memory"][(precision, stage)] = {
                **optimizer_memory(optimizer), "num_params": model.num_local_parameters(),
                "num_buckets": len(optimizer.buckets)}
    # Three micro-batches, stage 2: each bucket is reduce-scattered once, after the last one.
    cfg = compose_config(FAST + ["parallel.zero_stage=2"])
    model = GPT(model_cfg, grid, seed=1)
    optimizer = build_optimizer([model], cfg, grid, num_microbatches=3)
    tokens = torch.randint(0, 256, (3, 2, 16), generator=torch.Generator().manual_seed(grid.rank))
    launched_after = []
    for i in range(3):
        (model(tokens[i], tokens[i]) / 3).backward()
        launched_after.append(optimizer.reductions_launched)
    result = optimizer.step()
    out["reductions"] = {"after_each_microbatch": launched_after,
                         "num_buckets": len(optimizer.buckets), "skipped": result.skipped,
                         "grad_left_on_params": any(p.grad is not None for p in model.parameters())}
    return out


def _dp2_checks(run_root: str) -> dict:
    _train_every_stage(run_root, ["parallel.dp=2"],
                       {"stage3_full_recompute": ["parallel.zero_stage=3",
                                                  "train.activation_checkpointing=full"],
                        "stage2_selective_recompute": ["parallel.zero_stage=2",
                                                       "train.activation_checkpointing=selective"]})
    return _memory_and_reduction_checks()


def _dp4_checks(run_root: str) -> None:
    _train_every_stage(run_root, ["parallel.dp=4", "train.micro_batch_size=1"], {})


def _tp2_pp2_dp2_checks(run_root: str) -> None:
    _train_every_stage(run_root, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2",
                                  "parallel.sequence_parallel=true"], {})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[float], list[float]]:
    """The single-process run: torch.optim.AdamW-equivalent, same global batch."""
    from nanomt.train import run

    run_dir = tmp_path_factory.mktemp("reference")
    run(compose_config(FAST + ["train.micro_batch_size=2"]), run_dir)
    return trajectory(run_dir)


LAYOUTS = {"dp2": (_dp2_checks, 2), "dp4": (_dp4_checks, 4), "tp2_pp2_dp2": (_tp2_pp2_dp2_checks, 8)}


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory) -> dict:
    runs = {}
    for name, (fn, world) in LAYOUTS.items():
        root = tmp_path_factory.mktemp(name)
        results = run_distributed(fn, world_size=world, args=(str(root),), timeout_s=400,
                                  collective_timeout_s=120)
        runs[name] = (root, results)
    return runs


def test_single_process_reference_matches_torch_adamw():
    """The flat-shard AdamW against torch.optim.AdamW (same math; the clipping coefficient may
    differ in the last bit because the norm is summed in another order)."""
    from nanomt.model import GPT, ModelConfig
    from nanomt.optim.adamw import build_adamw
    from nanomt.optim.grad_norm import clip_grad_norm
    from nanomt.parallel.zero import ZeroOptimizer

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_heads=4, seq_len=16)
    torch_model, flat_model = GPT(cfg, None, seed=3), GPT(cfg, None, seed=3)
    torch_adamw = build_adamw(torch_model, 1e-2, (0.9, 0.95), 1e-8, 0.1)
    flat_adamw = ZeroOptimizer([flat_model], None, zero_stage=0, lr=1e-2, betas=(0.9, 0.95),
                               eps=1e-8, weight_decay=0.1, grad_clip=1.0, num_microbatches=1,
                               bucket_size_mb=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens = torch.randint(0, 256, (2, 16), generator=generator)
        torch_adamw.zero_grad()
        torch_model(tokens, tokens).backward()
        norm = clip_grad_norm(list(torch_model.parameters()), 1.0, None)
        torch_adamw.step()
        flat_model(tokens, tokens).backward()
        result = flat_adamw.step()
        assert result.grad_norm == pytest.approx(norm, rel=1e-6)
    for p, q in zip(torch_model.parameters(), flat_model.parameters()):
        # atol: the key bias's gradient is pure rounding noise (softmax ignores a constant
        # added to every key), which Adam normalises into lr-sized steps of random sign.
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-4)


def test_flat_adamw_update_is_torch_adamw_bit_for_bit():
    from nanomt.optim.adamw import adamw_update_

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(1000, generator=generator)
    reference = torch.nn.Parameter(start.clone())
    torch_adamw = torch.optim.AdamW([reference], lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                                    weight_decay=0.1, foreach=False)
    master, exp_avg, exp_avg_sq = start.clone(), torch.zeros(1000), torch.zeros(1000)
    for step in range(1, 8):
        grad = torch.randn(1000, generator=generator)
        reference.grad = grad.clone()
        torch_adamw.step()
        master.mul_(1 - 3e-3 * 0.1)
        adamw_update_(master, grad, exp_avg, exp_avg_sq, step, 3e-3, (0.9, 0.95), 1e-8)
    assert torch.equal(master, reference.detach())


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("stage", STAGES)
def test_trajectory_matches_single_process_adamw(reference, layout_runs, layout, stage):
    root, _ = layout_runs[layout]
    losses, norms = trajectory(root / f"stage{stage}")
    ref_losses, ref_norms = reference
    assert len(losses) == STEPS and ref_losses[-1] < ref_losses[0] - 0.1  # it learns
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert norms == pytest.approx(ref_norms, rel=1e-5)


@pytest.mark.parametrize("name", ["stage3_full_recompute", "stage2_selective_recompute"])
def test_zero_with_activation_checkpointing_matches(reference, layout_runs, name):
    root, _ = layout_runs["dp2"]
    losses, norms = trajectory(root / name)
    assert losses == pytest.approx(reference[0], rel=1e-5)
    assert norms == pytest.approx(reference[1], rel=1e-5)


# ZeRO's bytes per parameter: (param, grad, optimizer state). Mixed-precision Adam: 2 + 2 + 12 =
# 16; fp32 Adam: the parameters are the master weights, so 4 + 4 + 8.
BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}


@pytest.mark.parametrize("precision", list(BYTES))
@pytest.mark.parametrize("stage", STAGES)
def test_bytes_per_rank_follow_zero_formulas(layout_runs, precision, stage):
    from nanomt.memory import zero_formula_bytes

    dp = 2
    for rank_result in layout_runs["dp2"][1]:
        measured = rank_result["memory"][(precision, stage)]
        expected = zero_formula_bytes(measured["num_params"], dp, stage, *BYTES[precision])
        for what, per_elem in zip(("params", "grads", "optimizer_state"), BYTES[precision]):
            # Each bucket pads to a multiple of dp: at most dp - 1 extra elements per bucket.
            slack = measured["num_buckets"] * (dp - 1) * per_elem
            assert expected[what] <= measured[what] <= expected[what] + slack, (what, measured)
    if precision == "bf16":
        total = 16 * measured["num_params"]
        sharded = sum(measured[k] for k in ("params", "grads", "optimizer_state"))
        assert sharded / total == pytest.approx(
            {0: 1.0, 1: (4 + 12 / dp) / 16, 2: (2 + 14 / dp) / 16, 3: 1 / dp}[stage], rel=0.01)


def test_gradients_reduced_once_per_step_after_the_last_microbatch(layout_runs):
    for rank_result in layout_runs["dp2"][1]:
        r = rank_result["reductions"]
        assert r["after_each_microbatch"] == [0, 0, r["num_buckets"]]
        assert r["num_buckets"] > 1 and not r["skipped"] and not r["grad_left_on_params"]
