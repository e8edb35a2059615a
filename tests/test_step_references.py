"""The training step against references written by someone else, through the code training runs.

- The whole optimizer step (global norm, clip coefficient capped at 1, AdamW with decoupled
  decay on matrices only, bias correction, the learning-rate schedule's values) against
  `torch.nn.utils.clip_grad_norm_` and `torch.optim.AdamW` driving a copy of the same model on
  the same micro-batches, parameter by parameter after every step. The clip threshold lies
  inside the run's range of gradient norms, so some steps clip and some do not (asserted).
- Evaluation between steps leaves training alone (dropout on): the losses equal a run without
  evaluation.
- fp16's loss scaler: its state round trip, and a resume stopped between two growths whose
  every step's loss scale equals the uninterrupted run's.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from nanomt.memory import PeakMemoryMeter
from nanomt.optim.loss_scaler import DynamicLossScaler
from nanomt.testing import compose_config
from nanomt.train import run
from nanomt.trainer import setup

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=32",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_interval=0",
        "train.eval_batches=1", "train.progress_bar=false", "train.sample=false",
        "train.measure_memory=false", "logging.wandb.mode=disabled"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- the optimizer step against torch's AdamW and clip_grad_norm_ ------------------------------
STEPS, GRAD_CLIP = 10, 1.2
REFERENCE_RUN = TINY + [f"train.steps={STEPS}", "optim.lr=1e-2", "optim.min_lr=1e-3",
                        "optim.warmup_steps=2", "optim.weight_decay=0.1",
                        f"optim.grad_clip={GRAD_CLIP}", "optim.beta2=0.95"]


def decays_by_name(name: str) -> bool:
    """The MT-NLG recipe, written here from the names: biases and norm weights do not decay."""
    return not (name.endswith("bias") or "norm" in name)


def torch_adamw(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    named = list(model.named_parameters())
    o = cfg.optim
    groups = [{"params": [p for n, p in named if decays_by_name(n)],
               "weight_decay": float(o.weight_decay)},
              {"params": [p for n, p in named if not decays_by_name(n)], "weight_decay": 0.0}]
    assert groups[0]["params"] and groups[1]["params"]
    return torch.optim.AdamW(groups, lr=float(o.lr), betas=(float(o.beta1), float(o.beta2)),
                             eps=float(o.eps), foreach=False)


def test_optimizer_step_equals_torch_adamw_and_clip_grad_norm(tmp_path):
    cfg = compose_config(REFERENCE_RUN + [f"checkpoint.dir={tmp_path / 'ckpt'}"])
    trainer = setup(cfg, tmp_path / "run")
    model = trainer.model_chunks[0]
    reference = copy.deepcopy(model)
    optimizer = torch_adamw(reference, cfg)
    meter = PeakMemoryMeter()
    clipped = []
    for step in range(STEPS):
        micro_batches = trainer.micro_batches(trainer.train_data, step)
        lr = trainer.lr_at(step)
        record = trainer.train_step(step, meter)

        optimizer.zero_grad(set_to_none=True)
        loss = sum(reference(x, y) for x, y in micro_batches) / len(micro_batches)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), GRAD_CLIP))
        clipped.append(norm > GRAD_CLIP)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()

        assert record["loss"] == pytest.approx(loss.item(), rel=1e-5), step
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-5), step
        assert record["lr"] == lr
        for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=3e-5,
                                       msg=lambda m, step=step, name=name: f"{name} after "
                                                                           f"step {step}: {m}")
    # the threshold sits inside the run's norms: the cap and the coefficient both apply
    assert any(clipped) and not all(clipped), clipped
    assert lr < float(cfg.optim.lr)  # the cosine has begun


# ---- evaluation leaves training alone -----------------------------------------------------------
def test_evaluation_with_dropout_leaves_the_training_losses_unchanged(tmp_path):
    """Validation passes every 2 steps switch the model to eval mode and back: with dropout on,
    a model left in eval mode (or an evaluation that moved the dropout RNG) changes every
    later loss."""
    base = TINY + ["train.steps=6", "model.dropout=0.2", "optim.lr=1e-2", "optim.warmup_steps=1",
                   f"checkpoint.dir={tmp_path / 'ckpt'}"]
    run(compose_config(base + ["train.eval_interval=0"]), tmp_path / "plain")
    run(compose_config(base + ["train.eval_interval=2"]), tmp_path / "evaluated")
    plain, evaluated = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "evaluated")
    assert [r["loss"] for r in evaluated] == [r["loss"] for r in plain]
    assert [r["step"] for r in evaluated if "val_loss" in r] == [2, 4, 6]
    # dropout really is on: the same weights score differently in train and eval mode
    assert evaluated[-1]["val_loss"] != pytest.approx(evaluated[-1]["loss"], rel=1e-3)


# ---- fp16's loss scaler: state and resume -------------------------------------------------------
def test_loss_scaler_state_round_trips_mid_interval():
    scaler = DynamicLossScaler(initial_scale=8.0, growth_interval=3, min_scale=1.0)
    for overflow in (False, True, False, False, False, False):  # grows after the 3rd clean one
        scaler.update(overflow)
    state = scaler.state_dict()
    assert state == {"scale": 8.0, "clean_steps": 4}
    copy_ = DynamicLossScaler(initial_scale=2.0**16, growth_interval=3, min_scale=1.0)
    copy_.load_state_dict(state)
    assert copy_.state_dict() == state
    for _ in range(3):  # both grow at the same step: clean step 6, not 3 steps from the load
        scaler.update(False)
        copy_.update(False)
        assert copy_.state_dict() == scaler.state_dict()
    assert scaler.state_dict()["scale"] == 16.0


def test_fp16_resume_between_growths_follows_the_uninterrupted_loss_scale(tmp_path):
    """growth_interval 3 over 8 steps: the scale doubles after steps 3 and 6. Stopped after
    step 5 (two clean steps into the second interval), the resumed run must double it after
    step 6 too: a scaler that forgot its clean steps would wait until step 8."""
    base = TINY + ["train.steps=8", "train.precision=fp16", "train.loss_scale.initial=64",
                   "train.loss_scale.growth_interval=3", "optim.lr=1e-3",
                   "optim.warmup_steps=1"]
    run(compose_config(base + [f"checkpoint.dir={tmp_path / 'whole_ckpt'}"]), tmp_path / "whole")
    split = base + [f"checkpoint.dir={tmp_path / 'split_ckpt'}"]
    run(compose_config(split + ["train.exit_after=5"]), tmp_path / "split")
    run(compose_config(split + ["train.resume=auto"]), tmp_path / "split")
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    scales = [r["loss_scale"] for r in whole]
    assert not any(r["skipped"] for r in whole)
    assert scales == [64.0 * 2 ** (step // 3) for step in range(1, 9)]  # after each step's update
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss_scale"] for r in resumed] == scales
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    assert all(math.isfinite(r["loss"]) for r in whole)


# ---- a collective decision the ranks disagree on fails as such, not as a transport crash -------
def _disagree_on_skipping(run_root: str) -> str:
    """2 dp ranks at ZeRO-1; rank 1's copy of the global inf/nan verdict is made to say "inf"
    at step 2 (the bug this guards against: a verdict summed over too small a group)."""
    import torch.distributed as dist

    from nanomt.errors import RanksDisagree
    from nanomt.optim.sharded_adamw import ShardedAdamW

    clip_grads, calls = ShardedAdamW.clip_grads, []

    def clip_grads_seeing_inf(self, *args, **kwargs):
        totals = clip_grads(self, *args, **kwargs)
        calls.append(1)
        if dist.get_rank() == 1 and len(calls) == 2:
            totals = totals.clone()
            totals[1] = float("inf")
        return totals

    ShardedAdamW.clip_grads = clip_grads_seeing_inf
    cfg = compose_config(TINY + ["train.steps=3", "parallel.dp=2", "parallel.zero_stage=1",
                                 "parallel.timeout_s=30", f"checkpoint.dir={run_root}/ckpt"])
    try:
        run(cfg, Path(run_root) / "run")
    except RanksDisagree as error:
        return str(error)
    return "no error"


def test_ranks_that_disagree_on_a_skip_fail_naming_the_decision(tmp_path):
    from nanomt.testing import run_distributed

    messages = run_distributed(_disagree_on_skipping, world_size=2, args=(str(tmp_path),),
                               timeout_s=120)
    for message in messages:  # every rank, before either acts on its verdict
        assert message.startswith("step 2: the ranks disagree on skip the update"), message
        assert "from 0 to 1" in message
