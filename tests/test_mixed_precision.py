"""Mixed precision: fp16 dynamic loss scaling across tensor- and data-parallel ranks, bf16
against fp32.

CPUs here have no bf16/fp16 units (a big bf16 matmul is ~150x slower than fp32), so the models
are tiny: the point is the bookkeeping (masters, scaling, skip decisions), not speed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nanomt.optim.loss_scaler import DynamicLossScaler
from nanomt.testing import compose_config, run_distributed
from run_probes import step_dtypes

TINY = ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=4", "model.seq_len=16",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_interval=0",
        "train.eval_batches=1", "train.progress_bar=false", "train.measure_memory=false",
        "optim.warmup_steps=5", "logging.wandb.mode=disabled"]


def host_rule(verdicts: list[bool], scale: float, growth_interval: int, min_scale: float,
              max_overflows_at_min: int) -> list[tuple[float, int, int, int]]:
    """The loss-scaling rule in plain Python floats, as the scaler ran on the host before it
    moved to the device: (S, clean steps, overflows at min in a row, first update past the
    limit) after each verdict."""
    clean = at_min = failed_at = 0
    out = []
    for update, overflow in enumerate(verdicts, start=1):
        if overflow:
            at_min = at_min + 1 if scale <= min_scale else 0
            if at_min >= max_overflows_at_min and not failed_at:
                failed_at = update
            scale, clean = max(scale / 2, min_scale), 0
        else:
            at_min, clean = 0, clean + 1
            if clean % growth_interval == 0:
                scale *= 2
        out.append((scale, clean, at_min, failed_at))
    return out


@pytest.mark.parametrize("initial, min_scale", [(1024.0, 256.0), (48.0, 3.0), (1000.0, 0.3)])
def test_loss_scaler_on_the_device_follows_the_host_rule(initial, min_scale):
    # growth (3 clean in a row), halving, the clamp at a minimum (not always a power of two),
    # the run of overflows at it, and a random tail
    script = [True, False, False, False, False, False, False] + [True] * 8 + [False] * 4
    script += [True] * 4 + [False, True, True]
    script += [bool(b) for b in torch.randint(0, 2, (80,), generator=torch.Generator()
                                              .manual_seed(0))]
    expected = host_rule(script, initial, 3, min_scale, 3)
    scaler = DynamicLossScaler(initial, growth_interval=3, min_scale=min_scale,
                               max_overflows_at_min=3)
    for overflow, (scale, clean, at_min, failed_at) in zip(script, expected, strict=True):
        scaler.update(torch.tensor(overflow))
        assert scaler.state_dict() == {"scale": scale, "clean_steps": clean}
        assert int(scaler.overflows_at_min) == at_min and int(scaler.failed_at) == failed_at
    assert any(s == min_scale for s, *_ in expected) and any(s > initial for s, *_ in expected)
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
    assert scaler.scale.dtype == torch.float64


def test_loss_scaler_stops_when_overflows_persist_at_the_minimum():
    scaler = DynamicLossScaler(initial_scale=4.0, growth_interval=3, min_scale=1.0,
                               max_overflows_at_min=3)
    # 4 -> 2 -> 1: not yet at the minimum when these overflowed; then one at it; a clean step
    # resets the count; two more at the minimum, and the third of the run (update 7) stops
    for overflow in (True, True, True, False, True, True):
        scaler.update(overflow)
        scaler.check(int(scaler.failed_at), step=10)  # nothing yet
    scaler.update(True)  # the step's read finds the stop at once (every step reads)
    assert int(scaler.failed_at) == 7 == scaler.updates
    with pytest.raises(FloatingPointError, match=r"^step 19: 3 steps in a row"
                                                 r".*train.loss_scale.min"):
        scaler.check(int(scaler.failed_at), step=19)


def _fp16_overflow_checks() -> dict:
    """A 2 (tp) x 2 (dp) grid; the inf appears on one rank only: tp rank 1 of dp rank 0."""
    from nanomt.model import GPT, ModelConfig
    from nanomt.parallel.grid import ParallelGrid
    from nanomt.optim import build_optimizer
    from nanomt.parallel.data_parallel import finalize_grads

    grid = ParallelGrid(2, 1, 2)
    model_cfg = ModelConfig(num_layers=1, hidden_size=32, num_heads=4, seq_len=16)
    tokens = torch.randint(0, 256, (2, 2, 16),
                           generator=torch.Generator().manual_seed(grid.dp_rank))

    def one_step(precision: str, poison: bool = False, steps: int = 1):
        cfg = compose_config(TINY + ["parallel.zero_stage=1", f"train.precision={precision}",
                                     "train.loss_scale.initial=1024", "parallel.tp=2",
                                     "parallel.dp=2"])
        model = GPT(model_cfg, grid, seed=1)
        optimizer = build_optimizer([model], cfg, grid, num_microbatches=1)
        for step in range(steps):
            optimizer.zero_grad()
            (model(tokens[step], tokens[step]) * optimizer.loss_scale).backward()
            result = optimizer.step()
        return model, optimizer, result

    out = {}
    _, _, fp32_result = one_step("fp32")
    model, optimizer, clean = one_step("fp16")
    out["fp32_norm"], out["fp16_norm"], out["clean_skipped"] = (
        fp32_result.grad_norm, clean.grad_norm, clean.skipped)
    out["scale_before"] = float(optimizer.loss_scale)
    # A second step whose gradient overflows on one rank only, after the reductions: every
    # other rank (its tp peer, the other dp replica and its tp peer) must skip with it.
    optimizer.zero_grad()
    (model(tokens[1], tokens[1]) * optimizer.loss_scale).backward()
    finalize_grads(optimizer.buffer)
    if grid.dp_rank == 0 and grid.tp_rank == 1:
        optimizer.buffer.local_grad_shards()[0][0] = float("inf")
    params_before = [p.detach().clone() for p in model.parameters()]
    masters_before = [s.master.clone() for s in optimizer.shards]
    poisoned = optimizer.step()
    out["poisoned_skipped"] = poisoned.skipped
    out["scale_after"] = float(optimizer.loss_scale)
    out["params_untouched"] = all(torch.equal(a, p) for a, p in zip(params_before,
                                                                    model.parameters()))
    out["masters_untouched"] = all(torch.equal(a, s.master)
                                   for a, s in zip(masters_before, optimizer.shards))
    out["adam_steps"] = optimizer.step_count
    return out


@pytest.fixture(scope="module")
def fp16_results() -> list[dict]:
    return run_distributed(_fp16_overflow_checks, world_size=4, timeout_s=400,
                           collective_timeout_s=120)


def test_fp16_overflow_skips_on_every_rank_halves_scale_keeps_weights(fp16_results):
    for r in fp16_results:
        assert not r["clean_skipped"]
        assert r["poisoned_skipped"], "every rank, including the one without inf, must skip"
        assert r["scale_after"] == r["scale_before"] / 2
        assert r["params_untouched"] and r["masters_untouched"]
        assert r["adam_steps"] == 1


def test_fp16_gradients_are_unscaled(fp16_results):
    # The loss was scaled by 1024 for backward; the reported norm is the true one.
    for r in fp16_results:
        assert r["fp16_norm"] == pytest.approx(r["fp32_norm"], rel=2e-2)


def read_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def dtypes_of_one_step(overrides: list[str], run_dir: Path) -> dict[str, set]:
    return step_dtypes(compose_config(TINY + overrides), run_dir)


def test_bf16_training_tracks_fp32(tmp_path):
    from nanomt.train import run

    bf16, fp32 = {torch.bfloat16}, {torch.float32}
    # bf16 compute; gradients accumulated and reduced in fp32 (train.fp32_grads, the default) or
    # in bf16; fp32 master weights either way (nanomt.optim.build, nanomt.optim.sharded_adamw)
    assert dtypes_of_one_step(["train.precision=bf16"], tmp_path / "d1") == {
        "params": bf16, "autograd_grads": bf16, "accumulated_grads": fp32, "masters": fp32}
    assert dtypes_of_one_step(["train.precision=bf16", "train.fp32_grads=false"],
                              tmp_path / "d2") == {
        "params": bf16, "autograd_grads": bf16, "accumulated_grads": bf16, "masters": fp32}
    assert all(found == fp32 for found in dtypes_of_one_step([], tmp_path / "d3").values())

    steps = ["train.steps=50"]
    run(compose_config(TINY + steps), tmp_path / "fp32")
    run(compose_config(TINY + steps + ["train.precision=bf16"]), tmp_path / "bf16")
    fp32_losses, bf16_losses = read_losses(tmp_path / "fp32"), read_losses(tmp_path / "bf16")
    assert fp32_losses[-1] < fp32_losses[0] - 0.5  # it learned something over 50 steps
    assert all(a != b for a, b in zip(fp32_losses[1:], bf16_losses[1:]))  # bf16 was not ignored
    fp32_end, bf16_end = sum(fp32_losses[-5:]) / 5, sum(bf16_losses[-5:]) / 5
    assert math.isfinite(bf16_end) and abs(bf16_end - fp32_end) < 0.02 * fp32_end
