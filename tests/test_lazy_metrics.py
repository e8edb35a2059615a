"""logging.metrics_interval: a record every N steps, and nothing else changes. Every step still
reads the device once and the host decides its skip; against metrics_interval=1 (a record every
step): the same weights and optimizer state bit for bit, the same loss and norm at the shared
records, the interval's aggregates, the same skip of an inf/nan step when it falls between
records, the same stops (train.max_skipped_steps, fp16's loss_scale.min) at the very step that
trips them, even between records, and a bit-exact resume. The host syncs themselves are counted
in tests/test_zero_traffic.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nanomt.errors import NonFiniteError
from nanomt.memory import PeakMemoryMeter
from nanomt.optim.sharded_adamw import ShardedAdamW
from nanomt.testing import compose_config
from nanomt.train import run
from nanomt.trainer import setup

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_len=16",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=0",
        "train.progress_bar=false", "train.measure_memory=false", "train.sample=false",
        "logging.wandb.mode=disabled", "checkpoint.interval=0", "train.device=cpu",
        "optim.warmup_steps=2"]
STEPS = 8
CLIP_GRADS = ShardedAdamW.clip_grads


def poisoning(monkeypatch, steps: set[int]) -> None:
    """A nan in the first gradient shard of the listed steps (1-based, counted from this call),
    after the reductions."""
    original, calls = CLIP_GRADS, []

    def clip_grads(self, *args, **kwargs):
        calls.append(1)
        if len(calls) in steps:
            self.buffer.local_grad_shards()[0][0] = float("nan")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardedAdamW, "clip_grads", clip_grads)


def train_steps(run_dir: Path, overrides: list[str], keep: tuple[int, ...] = ()
                ) -> tuple[list[dict], ShardedAdamW, dict]:
    """STEPS steps through Trainer.train_step; the records, the optimizer and copies of its
    state after the steps in `keep` (1-based)."""
    t = setup(compose_config(TINY + [f"train.steps={STEPS}", *overrides]), run_dir)
    records, kept = [], {}
    for step in range(STEPS):
        records.append(t.train_step(step, PeakMemoryMeter()))
        if step + 1 in keep:
            kept[step + 1] = [x.clone() for x in optimizer_state(t.optimizer)]
    return records, t.optimizer, kept


def optimizer_state(optimizer: ShardedAdamW) -> list[torch.Tensor]:
    return [p.detach() for _, p in optimizer.named_parameters()] + [
        tensor for shard in optimizer.shards
        for tensor in (shard.master, shard.exp_avg, shard.exp_avg_sq)]


def assert_same_state(a: ShardedAdamW, b: ShardedAdamW) -> None:
    assert a.step_count == b.step_count
    for x, y in zip(optimizer_state(a), optimizer_state(b), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_records_every_fourth_step_and_trains_the_same(tmp_path, precision):
    every, every_step = (train_steps(tmp_path / str(n), [f"logging.metrics_interval={n}",
                                                         f"train.precision={precision}"])[:2]
                         for n in (4, 1))
    assert [r is not None for r in every[0]] == [False, False, False, True] * 2
    assert_same_state(every[1], every_step[1])
    for record in filter(None, every[0]):
        same = every_step[0][record["step"] - 1]
        for key in ("loss", "grad_norm", "lr", "loss_scale", "consumed_samples", "skipped",
                    "skipped_steps"):
            assert record[key] == same[key] or math.isnan(record[key]) and math.isnan(same[key])
        interval = every_step[0][record["step"] - 4: record["step"]]
        losses = [r["loss"] for r in interval if not r["skipped"]]  # fp16: the first overflow
        assert record["loss_mean"] == sum(losses) / len(losses)
        assert record["interval_steps"] == 4
        assert record["skipped_in_interval"] == sum(r["skipped"] for r in interval)
    assert all(r["interval_steps"] == 1 for r in every_step[0])
    assert all(r["loss_mean"] == r["loss"] for r in every_step[0] if not r["skipped"])


def test_an_inf_nan_step_between_records_is_skipped_as_on_the_host(tmp_path, monkeypatch):
    allow = "train.max_skipped_steps=1"
    poisoning(monkeypatch, {2})
    every, *lazy = train_steps(tmp_path / "4", ["logging.metrics_interval=4", allow], (1, 2))
    poisoning(monkeypatch, {2})
    every_step, *eager = train_steps(tmp_path / "1", ["logging.metrics_interval=1", allow])
    assert [r["skipped"] for r in every_step] == [False, True] + [False] * 6
    for before, after in zip(lazy[1][1], lazy[1][2], strict=True):  # nothing moved
        assert torch.equal(before, after)
    assert math.isnan(every_step[1]["grad_norm"])
    assert_same_state(lazy[0], eager[0])
    assert lazy[0].step_count == STEPS - 1  # Adam's t did not advance on the skipped step
    fourth = every[3]
    assert fourth["skipped"] is False and fourth["skipped_in_interval"] == 1
    assert fourth["skipped_steps"] == 1 and fourth["loss"] == every_step[3]["loss"]
    applied = [every_step[i]["loss"] for i in (0, 2, 3)]
    assert fourth["loss_mean"] == sum(applied) / 3  # the skipped step does not count


def test_an_fp16_overflow_between_records_halves_the_scale_as_on_the_host(tmp_path,
                                                                         monkeypatch):
    fp16 = "train.precision=fp16"
    poisoning(monkeypatch, {6})
    every, *lazy = train_steps(tmp_path / "4", ["logging.metrics_interval=4", fp16], (5, 6))
    poisoning(monkeypatch, {6})
    every_step, *eager = train_steps(tmp_path / "1", ["logging.metrics_interval=1", fp16])
    assert every_step[5]["skipped"] and not every_step[4]["skipped"]
    assert every_step[5]["loss_scale"] == every_step[4]["loss_scale"] / 2
    for before, after in zip(lazy[1][5], lazy[1][6], strict=True):  # nothing moved
        assert torch.equal(before, after)
    assert_same_state(lazy[0], eager[0])
    assert lazy[0].loss_scaler.state_dict() == eager[0].loss_scaler.state_dict()
    eighth = every[7]
    assert eighth["loss_scale"] == every_step[7]["loss_scale"]
    assert eighth["skipped_in_interval"] == sum(r["skipped"] for r in every_step[4:8]) >= 1
    assert eighth["skipped_steps"] == every_step[7]["skipped_steps"]


def test_fp16_overflows_at_the_minimum_scale_stop_at_that_step(tmp_path, monkeypatch):
    """Ten overflows in a row with the scale at train.loss_scale.min (here from the start):
    the 10th, step 10, stops the run, with metrics_interval=4 too (between records)."""
    overrides = TINY + ["train.steps=12", "train.precision=fp16", "train.loss_scale.initial=1",
                        "train.loss_scale.min=1"]
    for every in (1, 4):
        poisoning(monkeypatch, set(range(1, 11)))  # counts its calls afresh
        with pytest.raises(FloatingPointError, match=r"^step 10: 10 steps in a row.*"
                                                     r"train\.loss_scale\.min"):
            run(compose_config(overrides + [f"logging.metrics_interval={every}"]),
                tmp_path / str(every))
    rows = [json.loads(line) for line in (tmp_path / "4" / "metrics.jsonl").open()]
    assert [(r["step"], r["skipped_in_interval"], r["loss_scale"]) for r in rows] == [
        (4, 4, 1.0), (8, 4, 1.0)]


def test_max_skipped_steps_stops_at_that_step(tmp_path, monkeypatch):
    """Steps 2 and 3 non-finite with one skip allowed: step 3 stops the run, and writes its
    record first, with metrics_interval=4 too (its record covers steps 1-3)."""
    overrides = TINY + [f"train.steps={STEPS}", "train.max_skipped_steps=1"]
    for every in (1, 4):
        poisoning(monkeypatch, {2, 3})  # counts its calls afresh
        with pytest.raises(NonFiniteError, match=r"^step 3: loss .* not finite \(2 such steps"):
            run(compose_config(overrides + [f"logging.metrics_interval={every}"]),
                tmp_path / str(every))
    rows = [json.loads(line) for line in (tmp_path / "4" / "metrics.jsonl").open()]
    assert [(r["step"], r["interval_steps"], r["skipped_in_interval"]) for r in rows] == [
        (3, 3, 2)]


def test_records_at_evaluations_checkpoints_and_the_end_and_a_bit_exact_resume(tmp_path,
                                                                               monkeypatch):
    poisoning(monkeypatch, {2})  # a skip before the save: Adam's t must be saved exactly
    overrides = TINY + ["train.steps=10", "train.eval_interval=5", "checkpoint.interval=3",
                        "logging.metrics_interval=4", "train.max_skipped_steps=1"]
    run(compose_config(overrides), tmp_path / "whole")
    steps = [json.loads(line)["step"] for line in (tmp_path / "whole" / "metrics.jsonl").open()]
    assert steps == [3, 4, 5, 6, 8, 9, 10]
    poisoning(monkeypatch, {2})
    run(compose_config(overrides + ["train.exit_after=5"]), tmp_path / "split")
    meta = json.loads((tmp_path / "split" / "checkpoints" / "step_00000005" / "meta.json")
                      .read_text())
    assert meta["optimizer_scalars"]["step"] == 4
    run(compose_config(overrides + ["train.resume=auto"]), tmp_path / "split")
    whole, split = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
                    for name in ("whole", "split"))
    assert [r["step"] for r in split] == [3, 4, 5, 6, 8, 9, 10]
    assert [(r["loss"], r["grad_norm"]) for r in whole] == [(r["loss"], r["grad_norm"])
                                                            for r in split]
