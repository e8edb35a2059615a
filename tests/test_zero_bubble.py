"""ZB-H1 and ZB-V: the zero-bubble schedules' orders, plans, and gradients against one process.

Without processes: every rank's order runs each micro-batch's F before its B before its W;
ZB-H1 keeps 1F1B's forwards and backwards (so 1F1B's peak in flight), ZB-V holds at most 1F1B's
first stage's activations (2p chunk passes) with its chunks in a V; both pass the posting replay
with W exchanging nothing and, timed with F = B = W and free messages, have a shorter step than
1F1B (ZB-H1) and interleaved 1F1B (ZB-V). Distributed (four gloo ranks): loss and every gradient
equal the single-process model at pp=2 and pp=4 and pp=2 x tp=2 with sequence parallelism, and
10-step training runs (ZeRO-1, ZeRO-3 + full recompute, tp=2 + SP, cp=2 + selective recompute,
fp16; a checkpoint saved under zb_h1 or zbv resumed under 1F1B) follow the single-process losses.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import pytest

from nanomt.parallel.pipeline.partition import global_chunk_index, rank_of_chunk
from nanomt.parallel.pipeline.posting import checked_plans, match_batches
from nanomt.parallel.pipeline.schedules import PipelineOp, schedule_order
from nanomt.parallel.pipeline.zero_bubble import zb_h1_order, zb_h1_slots, zbv_steps
from nanomt.testing import run_distributed
from test_pipeline import CFG, TRAIN_OVERRIDES, read_metrics, reference, run_case
from test_pipeline_posting import step_time

UNTIED = dataclasses.replace(CFG, tie_embeddings=False)  # ZB-V: first and last chunk on rank 0


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


def test_deferring_linears_are_installed_for_one_step_only():
    """Inside the block the linears leave dW to W (and W supplies the same gradients); after
    it they are the core's again, bitwise."""
    import torch

    from nanomt.model import GPT
    from nanomt.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from nanomt.parallel.weight_grad_store import STORE, deferring_weight_grads

    model = GPT(CFG, None, seed=1)
    linears = [m for m in model.modules()
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    hooked = [m for m in linears if {"parallel_linear", "matmul"} & set(vars(m))]
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))

    def backward() -> list[torch.Tensor | None]:
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return grads

    before = backward()
    with deferring_weight_grads([model]):
        assert len([m for m in linears if {"parallel_linear", "matmul"} & set(vars(m))]) \
            == len(linears) > 0
        with STORE.backward_of((0, 0)):
            model(tokens[:, :-1], tokens[:, 1:]).backward()
        assert all(m.weight.grad is None for m in linears)  # left to W
        STORE.run((0, 0))
        deferred = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    assert not hooked and not [m for m in linears if {"parallel_linear", "matmul"} & set(vars(m))]
    assert all(torch.equal(a, b) for a, b in zip(before, backward()))
    for a, b in zip(before, deferred):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_zbv_places_its_chunks_in_a_v():
    for pp in range(2, 9):
        held = {rank: [global_chunk_index(c, rank, pp, v_shape=True) for c in (0, 1)]
                for rank in range(pp)}
        assert held == {rank: [rank, 2 * pp - 1 - rank] for rank in range(pp)}
        assert held[0] == [0, 2 * pp - 1] and held[pp - 1] == [pp - 1, pp]
        assert all(rank_of_chunk(k, pp, v_shape=True) == rank
                   for rank, chunks in held.items() for k in chunks)


def test_zbv_order_runs_every_pass_once_within_1f1b_memory():
    for pp in range(2, 7):
        for m in range(1, 3 * pp + 1):
            steps = zbv_steps(pp, m)
            for rank, rank_steps in enumerate(steps):
                order = [op for slot in rank_steps for op in slot]
                assert sorted(map(str, order)) == sorted(
                    str(PipelineOp(kind, i, c)) for kind in "FBW" for i in range(m)
                    for c in (0, 1)), (pp, m, rank)
                at = {(op.kind, op.microbatch, op.chunk): n for n, op in enumerate(order)}
                for i in range(m):
                    for c in (0, 1):
                        assert at[("F", i, c)] < at[("B", i, c)] < at[("W", i, c)]
                held = peak = 0  # chunk passes whose activations wait for their W
                for op in order:
                    held += {"F": 1, "W": -1}.get(op.kind, 0)
                    peak = max(peak, held)
                # 1F1B's first stage: min(p, m) micro-batches of its two chunks' layers
                assert peak <= 2 * min(pp, m), (pp, m, rank, peak)
            plans = checked_plans("zbv", pp, m, 2, False)  # replayed: no deadlock, rule 3
            checked_plans("zbv", pp, m, 2, True)
            for rank, plan in enumerate(plans):
                assert [op for e in plan for op in e.passes] == [
                    op for slot in steps[rank] for op in slot]
                for t in (t for exchange in plan for t in exchange.transfers):
                    assert t.op.kind != "W" and t.peer != rank  # the V's turn: no message


@pytest.mark.parametrize("pp,m", [(2, 8), (4, 8), (4, 16), (8, 16)])
def test_zbv_bubble_a_third_of_interleaved(pp, m):
    """F = B = W = 1 for a whole stage (each chunk's 1/2): ZB-V's bubble (p-1)/(6m), a third of
    interleaved 1F1B's (p-1)/(2m) at v = 2."""
    ideal = 3 * m
    zbv = step_time(checked_plans("zbv", pp, m, 2, False), 2, forward=1, backward=1, weights=1)
    interleaved = step_time(checked_plans("1f1b", pp, m, 2, False), 2, forward=1, backward=2)
    assert (interleaved - ideal) / ideal == pytest.approx((pp - 1) / (2 * m))
    assert (zbv - ideal) / ideal == pytest.approx((pp - 1) / (6 * m))


def _zb_checks(refs, untied_refs) -> dict:
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
        out.update({f"zbv_{name}": run_case(grid, tp, pp, 2, m, untied_refs, schedule="zbv",
                                            sp=sp, cfg=UNTIED)
                    for name, grid, tp, pp, m, sp in [("pp4", pp4, 1, 4, 8, False),
                                                      ("pp2", pp2_dp2, 1, 2, 8, False),
                                                      ("pp2tp2sp", pp2_tp2, 2, 2, 8, True),
                                                      ("pp2tp2", pp2_tp2, 2, 2, 3, False)]})
    out["deferred_under_zb"] = len(deferred) - out["deferred_under_1f1b"]
    return out


def test_zero_bubble_equals_single_process():
    refs = {("gpt", m): reference(m) for m in (4, 8)}
    untied_refs = {("gpt", m): reference(m, UNTIED) for m in (3, 8)}
    results = run_distributed(_zb_checks, world_size=4, args=(refs, untied_refs), timeout_s=500)
    for result in results:  # the weight gradients waited for W under zb_h1 only
        assert result.pop("deferred_under_1f1b") == 0
        assert result.pop("deferred_under_zb") > 0
    for case in results[0]:
        for r in (result[case] for result in results):
            assert r["loss_err"] < 1e-5, (case, r["loss_err"])
            assert r["grad_err"] < 1e-5, (case, r["grad_err"])
            assert r["saved_left_bytes"] == 0, case
        all_names = set((untied_refs if case.startswith("zbv") else refs)[("gpt", 8)][1])
        assert set().union(*(result[case]["names"] for result in results)) == all_names, case
    for rank, result in enumerate(results):  # as executed, and 1F1B's in-flight peak
        assert result["pp4"]["order"] == [str(op) for op in zb_h1_order(4, rank, 8)]
        assert result["pp4"]["peak"] == result["pp4_1f1b"]["peak"] == min(4 - rank, 8)
        assert result["zbv_pp4"]["order"] == [str(op) for slot in zbv_steps(4, 8)[rank]
                                              for op in slot]
    saved = {case: [result[case]["saved_peak_bytes"] for result in results]
             for case in ("pp4_1f1b", "pp4", "zbv_pp4")}
    print("peak saved activation bytes per pp rank (pp=4, m=8):", saved)
    for one_f_one_b, zb_h1 in zip(saved["pp4_1f1b"], saved["pp4"]):  # within 10%, rank by rank
        assert zb_h1 <= 1.1 * one_f_one_b
    assert max(saved["zbv_pp4"]) <= 1.1 * max(saved["pp4_1f1b"])  # 1F1B's first stage's


ZB_H1 = ["parallel.schedule=zb_h1"]
ZBV = ["parallel.schedule=zbv", "parallel.virtual_stages=2", "model.tie_embeddings=false"]
PP2 = ["parallel.pp=2"]
FP16 = ["train.precision=fp16", "model.hidden_size=16"]  # fp16 matmuls are slow on CPUs
ZB_TRAIN_RUNS = {  # name: (the single-process run it must follow, overrides)
    "zb_h1_pp2_dp2_zero1": ("tied", ZB_H1 + PP2 + ["parallel.zero_stage=1"]),
    "zb_h1_pp2_dp2_zero3_full_recompute": ("tied", ZB_H1 + PP2 + [
        "parallel.zero_stage=3", "train.activation_checkpointing=full"]),
    "zb_h1_pp2_tp2_sp": ("tied", ZB_H1 + PP2 + ["parallel.tp=2",
                                                "parallel.sequence_parallel=true"]),
    "zb_h1_pp2_cp2_selective": ("tied", ZB_H1 + PP2 + [
        "parallel.cp=2", "train.activation_checkpointing=selective"]),
    "zb_h1_pp2_dp2_fp16": ("tied_fp16", ZB_H1 + PP2 + FP16),
    "zbv_pp2_dp2_zero1": ("untied", ZBV + PP2 + ["parallel.zero_stage=1"]),
    "zbv_pp2_dp2_zero3_full_recompute": ("untied", ZBV + PP2 + [
        "parallel.zero_stage=3", "train.activation_checkpointing=full"]),
    "zbv_pp2_tp2_sp": ("untied", ZBV + PP2 + ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "zbv_pp2_cp2_selective": ("untied", ZBV + PP2 + [
        "parallel.cp=2", "train.activation_checkpointing=selective"]),
    "zbv_pp2_dp2_fp16": ("untied_fp16", ZBV + PP2 + FP16),
}
SINGLE_RUNS = {"tied": [], "tied_fp16": FP16, "untied": ["model.tie_embeddings=false"],
               "untied_fp16": ["model.tie_embeddings=false"] + FP16}


def _zb_train_runs(root: str) -> dict:
    import torch.distributed as dist

    from nanomt.testing import compose_config
    from nanomt.train import run

    out = {}
    for name, (_, overrides) in ZB_TRAIN_RUNS.items():
        run_dir = Path(root) / name
        run(compose_config(TRAIN_OVERRIDES + overrides), run_dir)
        dist.barrier()
        if dist.get_rank() == 0:
            out[name] = read_metrics(run_dir)
    # Saved under zb_h1 (zbv) after 5 steps, resumed under 1F1B: the same 10 losses.
    for name, schedule in (("zb_h1_then_1f1b", ZB_H1), ("zbv_then_1f1b", ZBV)):
        run_dir, layout = Path(root) / name, PP2 + ["parallel.zero_stage=1"]
        untied = ["model.tie_embeddings=false"] if schedule == ZBV else []
        run(compose_config(TRAIN_OVERRIDES + layout + schedule + ["train.exit_after=5"]), run_dir)
        run(compose_config(TRAIN_OVERRIDES + layout + untied + ["train.resume=auto"]), run_dir)
        dist.barrier()
        if dist.get_rank() == 0:
            records = read_metrics(run_dir)
            out[f"{name}_records"] = len(records)  # 5 + 5: no step ran twice
            by_step = {record["step"]: record for record in records}
            out[name] = [by_step[step] for step in sorted(by_step)]
    return out


def test_zero_bubble_training_matches_one_process():
    from nanomt.testing import compose_config
    from nanomt.train import run

    with tempfile.TemporaryDirectory() as root:
        expected = {}
        for name, overrides in SINGLE_RUNS.items():
            run(compose_config(TRAIN_OVERRIDES + overrides), Path(root) / f"single_{name}")
            expected[name] = read_metrics(Path(root) / f"single_{name}")
        results = run_distributed(_zb_train_runs, world_size=4, args=(root,), timeout_s=580)[0]
    assert results.pop("zb_h1_then_1f1b_records") == results.pop("zbv_then_1f1b_records") == 10
    references = {name: reference for name, (reference, _) in ZB_TRAIN_RUNS.items()}
    references.update(zb_h1_then_1f1b="tied", zbv_then_1f1b="untied")
    for name, got in results.items():
        assert len(got) == 10, name
        for mine, ref in zip(got, expected[references[name]]):
            assert math.isclose(mine["loss"], ref["loss"], rel_tol=1e-5), (name, mine, ref)


def step_time_waiting_where_taken(plans, forward: float, backward: float,
                                  weights: float) -> float:
    """As test_pipeline.step_time, with ZeroBubbleVStep's waits (v = 2): a rank posts each
    batch without waiting, and waits for one only before the pass that takes its message,
    until every partner batch is posted (test-side timing of its model)."""
    partners, length = match_batches(plans), {"F": forward, "B": backward, "W": weights}
    taken_from = {(rank, t.op): u for rank, plan in enumerate(plans)
                  for u, exchange in enumerate(plan) for t in exchange.transfers if not t.is_send}
    posted, clock, at = {}, [0.0] * len(plans), [0] * len(plans)
    while any(u < len(plan) for u, plan in zip(at, plans)):
        moved = False
        for rank, plan in enumerate(plans):
            if at[rank] == len(plan):
                continue
            posted.setdefault((rank, at[rank]), clock[rank])
            t = clock[rank]
            for op in plan[at[rank]].passes:
                u = taken_from.get((rank, op))
                batch = [] if u is None else [(rank, u)] + partners.get((rank, u), [])
                if not all(b in posted for b in batch):
                    break  # its message's batch is not posted on the far side yet
                t = max([t] + [posted[b] for b in batch]) + length[op.kind] / 2
            else:
                clock[rank], at[rank], moved = t, at[rank] + 1, True
        assert moved, "the timed plan is stuck"
    return max(clock)


@pytest.mark.parametrize("pp,m", [(2, 8), (4, 8), (4, 16), (8, 16)])
def test_zbv_bubble_below_interleaved_when_b_is_twice_f(pp, m):
    """T_B = 2 T_F = 2 T_W (this CPU's B is about twice its F): waiting for a batch only where
    its message is taken, ZB-V's bubble stays below interleaved 1F1B's (p-1)/(2m), which no
    ratio of the times changes; waiting at every batch (lockstep) it would not be."""
    ideal = 4 * m
    plans = checked_plans("zbv", pp, m, 2, False)
    zbv = step_time_waiting_where_taken(plans, forward=1, backward=2, weights=1)
    lockstep = step_time(plans, 2, forward=1, backward=2, weights=1)
    interleaved = step_time(checked_plans("1f1b", pp, m, 2, False), 2, forward=1, backward=3)
    assert (interleaved - ideal) / ideal == pytest.approx((pp - 1) / (2 * m))
    assert (zbv - ideal) / ideal < 0.6 * (pp - 1) / (2 * m), (pp, m, zbv)
    assert lockstep > interleaved, (pp, m, lockstep)
    # at F = B = W the waits cost nothing: the lockstep's (p-1)/(6m)
    assert step_time_waiting_where_taken(plans, 1, 1, 1) == pytest.approx(3 * m * (
        1 + (pp - 1) / (6 * m)))
