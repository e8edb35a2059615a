"""Checkpoints of experts' weights: each expert stored at its global index, any ep reads it.

1. The stand-in model of tests/test_moe_training.py (a dense matrix, E experts split over the
   ep group with an explicit all_to_all, a head) trains one step at ep=2 (dp=4, ZeRO-1), saves
   weights and AdamW state, and trains two more steps; the checkpoint is then resumed at ep=1
   and ep=4 under ZeRO-0, 1 and 3 (experts' ZeRO shards over expert_dp_group of another size)
   and at ep=2 itself, each training the same two steps: their losses equal the uninterrupted
   run's (bit for bit at ep=2, ZeRO-1, the layout it was saved in).
2. The real model (model=moe_tiny, made smaller) through nanomt.train on 4 ranks: saved at
   ep=2 under ZeRO-3 after 3 of 6 steps, resumed at ep=1 (ZeRO-1) and ep=4 (ZeRO-0) to the
   uninterrupted run's losses, and in its own layout bit for bit; meta.json marks the experts'
   stacks, stored whole (all E experts).
"""

from __future__ import annotations

import pytest

from test_moe_training import GRAD_CLIP, MICROBATCHES, OPTIM, StandIn, rank_data

MODEL_META = {"style": "gpt", "moe": {"num_experts": 4}}  # what check_model_config compares
RESUMES = ((2, 1), (1, 0), (1, 1), (1, 3), (4, 0), (4, 1), (4, 3))  # (ep, ZeRO stage)


def _build(dp: int, ep: int, stage: int):
    from nanomt.optim.sharded_adamw import ShardedAdamW
    from nanomt.parallel.data_parallel import GradientBuffer
    from nanomt.parallel.grid import ParallelGrid

    grid = ParallelGrid(dp=dp, ep=ep)
    model = StandIn(ep, grid.ep_rank, grid.ep_group)
    buffer = GradientBuffer([model], grid, zero_stage=stage, num_microbatches=MICROBATCHES,
                            bucket_size_mb=1e-4)
    return grid, model, ShardedAdamW(buffer, **OPTIM, grad_clip=GRAD_CLIP)


def _train_step(grid, model, optimizer, step: int) -> float:
    """One step on every rank's data; returns the loss averaged over the dp ranks."""
    import torch

    from nanomt.optim.grad_norm import read_norm
    from nanomt.parallel import comm
    from nanomt.parallel.data_parallel import finalize_grads

    x, target = rank_data(grid.dp_rank, step)
    optimizer.zero_grad()
    loss_sum = torch.zeros(())
    for i in range(MICROBATCHES):
        loss = model(x[i], target[i]) / MICROBATCHES
        loss.backward()
        loss_sum += loss.detach()
    finalize_grads(optimizer.buffer)
    norm, overflow, _ = read_norm(optimizer.clip_grads())
    optimizer.step(norm, overflow)
    return float(comm.all_reduce(loss_sum, grid.grad_sync_group)) / grid.dp_size


def _save_then_resume(root: str) -> dict:
    from nanomt.checkpoint.load import load_checkpoint
    from nanomt.checkpoint.save import save_checkpoint

    grid, model, optimizer = _build(dp=4, ep=2, stage=1)
    _train_step(grid, model, optimizer, step=0)
    save_checkpoint(root, 1, [model], optimizer, grid, meta={"model": MODEL_META})
    losses = {"saved": [_train_step(grid, model, optimizer, step) for step in (1, 2)]}
    for ep, stage in RESUMES:
        grid, model, optimizer = _build(dp=4, ep=ep, stage=stage)
        load_checkpoint(root, [model], optimizer, grid, MODEL_META)
        losses[(ep, stage)] = [_train_step(grid, model, optimizer, step) for step in (1, 2)]
    return losses


def test_a_checkpoint_saved_at_ep2_resumes_at_ep1_and_ep4(tmp_path):
    from nanomt.testing import run_distributed

    results = run_distributed(_save_then_resume, world_size=4, args=(str(tmp_path),),
                              timeout_s=300)
    losses = results[0]
    assert all(r == losses for r in results)  # every rank read the same averaged losses
    assert losses[(2, 1)] == losses["saved"]  # the same layout: bit for bit
    for ep, stage in RESUMES:
        assert losses[(ep, stage)] == pytest.approx(losses["saved"], rel=1e-6), (ep, stage)


# ---- the real model through nanomt.train ------------------------------------------------------
STEPS = 6
MOE_RUN = ["model=moe_tiny", "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
           "model.seq_len=16", "model.moe.ffn_hidden_size=32", "train.global_batch_size=8",
           "train.micro_batch_size=1", f"train.steps={STEPS}", "train.eval_interval=0",
           "train.progress_bar=false", "train.measure_memory=false", "optim.warmup_steps=2",
           "logging.wandb.mode=disabled", "parallel.dp=4", "train.device=cpu"]
# Saved at ep=2 under ZeRO-3 (each expert stack sharded over the 2 ranks of expert_dp_group);
# resumed at ep=1 under ZeRO-1 (the experts' state sharded over all 4 ranks) and at ep=4 under
# ZeRO-0 (every rank holds one expert whole).
SAVED = (2, 3)
MOE_RESUMES = {"ep1_zero1": (1, 1), "ep4_zero0": (4, 0)}


def _moe_layout(ep: int, stage: int) -> list[str]:
    return [f"parallel.ep={ep}", f"parallel.zero_stage={stage}"]


def _moe_save_then_resume(base: str) -> int:
    """On 4 ranks: 3 steps at ep=2 (ZeRO-3) and save; resume at ep=1 and 4; the uninterrupted
    run; the same layout resumed."""
    from pathlib import Path

    from nanomt.testing import compose_config
    from nanomt.train import run

    base = Path(base)
    saved = _moe_layout(*SAVED)
    run(compose_config(MOE_RUN + saved + ["train.exit_after=3"]), base / "ep2")
    for name, layout in MOE_RESUMES.items():
        run(compose_config(MOE_RUN + _moe_layout(*layout)
                           + [f"train.resume={base / 'ep2' / 'checkpoints'}"]), base / name)
    run(compose_config(MOE_RUN + saved), base / "ep2_whole")
    run(compose_config(MOE_RUN + saved + ["train.resume=auto"]), base / "ep2")
    return 0


def test_moe_checkpoint_saved_at_ep2_resumes_at_ep1_and_ep4(tmp_path):
    import json

    from nanomt.testing import run_distributed

    def losses(run_dir) -> list[float]:
        by_step = {}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            by_step[record["step"]] = record["loss"]
        return [by_step[step] for step in sorted(by_step)]

    run_distributed(_moe_save_then_resume, world_size=4, args=(str(tmp_path),), timeout_s=400)
    whole = losses(tmp_path / "ep2_whole")
    assert len(whole) == STEPS
    assert losses(tmp_path / "ep2") == whole  # the same layout: bit for bit
    meta = json.loads((tmp_path / "ep2" / "checkpoints" / "step_00000003" / "meta.json")
                      .read_text())
    experts = [name for name, record in meta["parameters"].items() if record.get("expert")]
    assert experts and all(meta["parameters"][n]["global_shape"][0] == 4 for n in experts)
    for name in MOE_RESUMES:
        resumed = losses(tmp_path / name)
        assert len(resumed) == STEPS - 3, name
        assert resumed == pytest.approx(whole[3:], rel=1e-5), name
