"""Checkpoints of experts' weights: each expert stored at its global index, any ep reads it.

The stand-in model of tests/test_moe_training.py (a dense matrix, E experts split over the ep
group with an explicit all_to_all, a head) trains one step at ep=2 (dp=4, ZeRO-1), saves
weights and AdamW state, and trains two more steps; the checkpoint is then resumed at ep=1 and
ep=4 under ZeRO-0, 1 and 3 (experts' ZeRO shards over expert_dp_group of another size) and at
ep=2 itself, each run training the same two steps: their losses equal the uninterrupted run's
(bit for bit at ep=2, ZeRO-1, the layout it was saved in).
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
