"""ZB-H1: the zero-bubble schedule's order, its plans, and its gradients against one process.

Without processes: every rank's order runs each micro-batch's F before its B before its W, keeps
1F1B's forwards and backwards (so 1F1B's peak in flight), passes the posting replay with W
exchanging nothing, and, timed with F = B = W and free messages, has a shorter step than 1F1B.
Distributed (four gloo ranks): loss and every gradient equal the single-process model at pp=2
and pp=4 and pp=2 x tp=2 with sequence parallelism, and 10-step training runs (ZeRO-1, ZeRO-3,
full recompute; a checkpoint saved under zb_h1 resumed under 1F1B) follow the single-process
losses.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest

from nanomt.parallel.pipeline.posting import checked_plans
from nanomt.parallel.pipeline.schedules import schedule_order
from nanomt.parallel.pipeline.zero_bubble import zb_h1_order, zb_h1_slots
from nanomt.testing import run_distributed
from test_pipeline import TRAIN_OVERRIDES, read_metrics, reference, run_case, step_time


def in_flight_peak(order) -> int:
    """Most micro-batches between their F and their B."""
    held = peak = 0
    for op in order:
        held += {"F": 1, "B": -1}.get(op.kind, 0)
        peak = max(peak, held)
    return peak


def test_zb_h1_order_keeps_1f1b_passes_and_memory():
    for pp in range(2, 9):
        for m in range(1, 3 * pp + 1):
            for rank in range(pp):
                order = zb_h1_order(pp, rank, m)
                one_f_one_b = schedule_order("1f1b", pp, rank, m)
                assert [op for op in order if op.kind != "W"] == one_f_one_b, (pp, m, rank)
                for i in range(m):
                    at = {op.kind: n for n, op in enumerate(order) if op.microbatch == i}
                    assert at["F"] < at["B"] < at["W"], (pp, m, rank, i)
                assert sorted(str(op) for op in order if op.kind == "W") == sorted(
                    f"W{i}" for i in range(m))
                assert in_flight_peak(order) == in_flight_peak(one_f_one_b) == min(pp - rank, m)
            plans = checked_plans("zb_h1", pp, m, 1, False)  # replayed: no deadlock, rule 3
            for rank, plan in enumerate(plans):
                assert [e.passes for e in plan if e.passes] == zb_h1_slots(pp, rank, m)
                for exchange in plan:
                    assert not any(t.op.kind == "W" for t in exchange.transfers)


@pytest.mark.parametrize("pp,m", [(2, 8), (4, 8), (4, 16), (8, 16)])
def test_zb_h1_bubble_below_1f1b(pp, m):
    """F = B = W = 1 (1F1B's backward B + W = 2): the paper's (p-1)/(3m) at p = 2; below
    1F1B's (p-1)/m everywhere, at most (p-1)/(2m)."""
    ideal = 3 * m
    zb = step_time(checked_plans("zb_h1", pp, m, 1, False), 1, forward=1, backward=1, weights=1)
    one_f_one_b = step_time(checked_plans("1f1b", pp, m, 1, False), 1, forward=1, backward=2)
    assert (one_f_one_b - ideal) / ideal == pytest.approx((pp - 1) / m)
    assert (zb - ideal) / ideal <= (pp - 1) / (2 * m) + 1e-9, (pp, m, zb)
    if pp == 2:
        assert (zb - ideal) / ideal == pytest.approx((pp - 1) / (3 * m))


def _zb_checks(refs) -> dict:
    import unittest.mock

    from nanomt.parallel.grid import ParallelGrid
    from nanomt.parallel.weight_grad_store import STORE

    pp4 = ParallelGrid(tp=1, pp=4, dp=1)
    pp2_dp2 = ParallelGrid(tp=1, pp=2, dp=2)
    pp2_tp2 = ParallelGrid(tp=2, pp=2, dp=1)
    deferred, put = [], STORE.put
    with unittest.mock.patch.object(STORE, "put", lambda work: (deferred.append(1), put(work))):
        out = {"pp4_1f1b": run_case(pp4, 1, 4, 1, 8, refs)}
        out["deferred_under_1f1b"] = len(deferred)
        out.update({"pp4": run_case(pp4, 1, 4, 1, 8, refs, schedule="zb_h1"),
                    "pp2": run_case(pp2_dp2, 1, 2, 1, 8, refs, schedule="zb_h1"),
                    "pp2tp2sp": run_case(pp2_tp2, 2, 2, 1, 8, refs, schedule="zb_h1", sp=True),
                    "pp2tp2": run_case(pp2_tp2, 2, 2, 1, 4, refs, schedule="zb_h1")})
    out["deferred_under_zb"] = len(deferred) - out["deferred_under_1f1b"]
    return out


def test_zb_h1_equals_single_process():
    refs = {("gpt", m): reference(m) for m in (4, 8)}
    results = run_distributed(_zb_checks, world_size=4, args=(refs,), timeout_s=400)
    all_names = set(refs[("gpt", 8)][1])
    for result in results:  # the weight gradients waited for W under zb_h1 only
        assert result.pop("deferred_under_1f1b") == 0
        assert result.pop("deferred_under_zb") > 0
    for case in results[0]:
        for r in (result[case] for result in results):
            assert r["loss_err"] < 1e-5, (case, r["loss_err"])
            assert r["grad_err"] < 1e-5, (case, r["grad_err"])
            assert r["saved_left_bytes"] == 0, case
        assert set().union(*(result[case]["names"] for result in results)) == all_names, case
    for rank, result in enumerate(results):  # as executed, and 1F1B's in-flight peak
        assert result["pp4"]["order"] == [str(op) for op in zb_h1_order(4, rank, 8)]
        assert result["pp4"]["peak"] == result["pp4_1f1b"]["peak"] == min(4 - rank, 8)


ZB_TRAIN_LAYOUTS = {
    "pp2_dp2_zero1": ["parallel.pp=2", "parallel.zero_stage=1"],
    "pp2_dp2_zero3_full_recompute": ["parallel.pp=2", "parallel.zero_stage=3",
                                     "train.activation_checkpointing=full"],
    "pp2_tp2_sp": ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
}


def _zb_train_runs(root: str) -> dict:
    import torch.distributed as dist

    from nanomt.testing import compose_config
    from nanomt.train import run

    out = {}
    for name, overrides in ZB_TRAIN_LAYOUTS.items():
        run_dir = Path(root) / name
        run(compose_config(TRAIN_OVERRIDES + overrides + ["parallel.schedule=zb_h1"]), run_dir)
        dist.barrier()
        if dist.get_rank() == 0:
            out[name] = read_metrics(run_dir)
    # Saved under zb_h1 after 5 steps, resumed under 1F1B: the same 10 losses.
    run_dir, layout = Path(root) / "zb_h1_then_1f1b", ["parallel.pp=2", "parallel.zero_stage=1"]
    run(compose_config(TRAIN_OVERRIDES + layout + ["parallel.schedule=zb_h1",
                                                   "train.exit_after=5"]), run_dir)
    run(compose_config(TRAIN_OVERRIDES + layout + ["train.resume=auto"]), run_dir)
    dist.barrier()
    if dist.get_rank() == 0:
        records = read_metrics(run_dir)
        out["records_logged_around_the_resume"] = len(records)  # 5 + 5: no step ran twice
        by_step = {record["step"]: record for record in records}
        out["zb_h1_then_1f1b"] = [by_step[step] for step in sorted(by_step)]
    return out


def test_zb_h1_training_matches_one_process():
    from nanomt.testing import compose_config
    from nanomt.train import run

    with tempfile.TemporaryDirectory() as root:
        run(compose_config(TRAIN_OVERRIDES), Path(root) / "single")
        expected = read_metrics(Path(root) / "single")
        results = run_distributed(_zb_train_runs, world_size=4, args=(root,), timeout_s=500)[0]
    assert results.pop("records_logged_around_the_resume") == 10
    for name, got in results.items():
        assert len(got) == 10, name
        for mine, ref in zip(got, expected):
            assert math.isclose(mine["loss"], ref["loss"], rel_tol=1e-5), (name, mine, ref)
