"""ZeRO's communication volume per step and rank, counted where the collectives are issued, and
the host syncs of a training step.

With Psi the (padded) parameter elements of a rank, in the paper's accounting (Rajbhandari et al.
2019, section 7; an all-reduce moves 2 Psi, a reduce-scatter or an all-gather Psi), the data
group moves per step, for m micro-batches under the default parallel.grad_reduce=step:

    stage 0   all-reduce of the gradients                                  2 Psi
    stage 1   reduce-scatter of the gradients + all-gather of the params   2 Psi
    stage 2   the same                                                     2 Psi
    stage 3   reduce-scatter + an all-gather before each forward and each
              backward of every micro-batch                                (1 + 2m) Psi

(the paper's 3 Psi is m = 1; the gradient part stays Psi at any m), and under the opt-in
parallel.grad_reduce=microbatch stages 2-3 reduce-scatter m Psi. Every step adds the
gradient norm's 2-element fp32 all-reduce (2 * 2 * 4 bytes). One dp=2 spawn counts all of these
through nanomt.parallel.comm; a pp=2 x dp=2 spawn counts the host syncs of a 1F1B + ZeRO-2 step
by wrapping the tensor methods that copy to the host.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from nanomt.testing import compose_config, run_distributed
from comm_counting import traffic_log

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_len=16",
        "train.micro_batch_size=1", "train.eval_interval=0", "train.progress_bar=false",
        "train.measure_memory=false", "logging.wandb.mode=disabled",
        "parallel.bucket_size_mb=0.02"]  # several buckets
NORM_BYTES = 2 * 2 * 4  # the gradient norm: an all-reduce of [sum of squares, inf/nan count]
MICROBATCHES = (1, 4)


def _dp_traffic(stage: int, m: int, grad_reduce: str, extra: tuple = ()) -> dict:
    from nanomt.model import GPT, ModelConfig
    from nanomt.optim import build_optimizer
    from nanomt.parallel.grid import ParallelGrid

    grid = ParallelGrid(1, 1, 2)
    cfg = compose_config(TINY + [f"parallel.zero_stage={stage}",
                                 f"parallel.grad_reduce={grad_reduce}", *extra])
    model = GPT(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=16), grid, seed=1)
    optimizer = build_optimizer([model], cfg, grid, num_microbatches=m)
    tokens = torch.randint(0, 256, (m, 2, 16), generator=torch.Generator().manual_seed(grid.rank))
    with traffic_log() as log:
        for i in range(m):
            (model(tokens[i], tokens[i]) / m).backward()
        result = optimizer.step()
    dp_log = [t for t in log if t.group == "dp"]
    return {"bytes": sum(t.volume_bytes for t in dp_log),
            "kinds": sorted({t.kind for t in dp_log}),
            "psi_bytes": 4 * sum(b.padded_numel for b in optimizer.buckets),
            "other_groups": sorted({t.group for t in log} - {"dp"}),
            "skipped": result.skipped, "norm": result.grad_norm,
            # ZeRO-3 parameters are freed between uses: no weights to read
            "weights": [p.detach().clone() for p in model.parameters()] if stage < 3 else []}


def _traffic_checks() -> dict:
    out = {}
    for stage in (0, 1, 2, 3):
        for m in MICROBATCHES:
            out[(stage, m, "step")] = _dp_traffic(stage, m, "step")
    for stage in (2, 3):
        out[(stage, 4, "microbatch")] = _dp_traffic(stage, 4, "microbatch")
    # every bucket's reduce-scatter may be in flight at once
    out[(2, 4, "wide")] = _dp_traffic(2, 4, "step", ("parallel.reduce_in_flight_mb=64",))
    return out


@pytest.fixture(scope="module")
def traffic() -> list[dict]:
    return run_distributed(_traffic_checks, world_size=2, timeout_s=240)


def expected_bytes(stage: int, m: int, grad_reduce: str, psi: int) -> int:
    """The module docstring's table."""
    gradients = psi * (m if grad_reduce == "microbatch" and stage >= 2 else 1)
    if stage == 0:
        return 2 * psi + NORM_BYTES
    if stage in (1, 2):
        return gradients + psi + NORM_BYTES
    return gradients + 2 * m * psi + NORM_BYTES


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("m", MICROBATCHES)
def test_bytes_per_step_and_rank_follow_zero_formulas(traffic, stage, m):
    for rank_result in traffic:
        r = rank_result[(stage, m, "step")]
        assert not r["skipped"] and r["other_groups"] == []
        assert r["bytes"] == expected_bytes(stage, m, "step", r["psi_bytes"]), r
        assert r["kinds"] == {0: ["all_reduce"], 1: ["all_gather", "all_reduce", "reduce_scatter"],
                              2: ["all_gather", "all_reduce", "reduce_scatter"],
                              3: ["all_gather", "all_reduce", "reduce_scatter"]}[stage]


def test_gradient_traffic_does_not_grow_with_microbatches_by_default(traffic):
    for rank_result in traffic:
        for stage in (0, 1, 2):
            assert rank_result[(stage, 4, "step")]["bytes"] == rank_result[(stage, 1, "step")]["bytes"]


@pytest.mark.parametrize("stage", [2, 3])
def test_reducing_every_microbatch_costs_m_times_the_gradient_traffic(traffic, stage):
    for rank_result in traffic:
        r = rank_result[(stage, 4, "microbatch")]
        assert r["bytes"] == expected_bytes(stage, 4, "microbatch", r["psi_bytes"]), r
        assert r["bytes"] - rank_result[(stage, 4, "step")]["bytes"] == 3 * r["psi_bytes"]


# ---- host syncs ------------------------------------------------------------------------------
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def _count_host_syncs(run_root: str, extra: tuple = (), steps: int = 2) -> dict:
    """Set up a pp=2 x dp=2 ZeRO-2 run (1F1B, 4 micro-batches) and count, in each step after
    the first (Trainer.train_step: schedule, finalize, optimizer update and the step's metrics
    record; then the checkpoint hook), the calls that copy a tensor to the host."""
    from nanomt.memory import PeakMemoryMeter
    from nanomt.trainer import setup

    cfg = compose_config(TINY + ["parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=2",
                                 "train.global_batch_size=8", f"train.steps={steps + 1}", *extra])
    t = setup(cfg, Path(run_root))
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counting(name):
        def method(self, *args, **kwargs):
            # torch's foreach AdamW reads its per-parameter step counts, which it keeps on the
            # host by design (on CUDA nanomt runs the fused AdamW, whose counts stay on the
            # device): not a device sync
            if not sys._getframe(1).f_globals.get("__name__", "").startswith("torch.optim"):
                calls.append(name)
            return originals[name](self, *args, **kwargs)
        return method

    t.train_step(0, PeakMemoryMeter())  # the first step builds what later steps reuse
    per_step, records = [], []
    for step in range(1, steps):
        calls.clear()
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, counting(name))
        try:
            records.append(t.train_step(step, PeakMemoryMeter()))
            # the loop's checkpoint hook, as nanomt.train calls it: the preemption signal was
            # read with the step's values (no save is due: train.steps is one step further)
            t.checkpointer.after_step(step + 1, t.model_chunks, t.optimizer, t.train_data, 1e-3,
                                      preempted=records[-1] is not None and t.preempted)
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
        per_step.append(list(calls))
    return {"calls": per_step, "records": records, "microbatches": t.num_microbatches,
            "adam_steps": t.optimizer.step_count}


def test_a_1f1b_zero2_step_syncs_the_host_at_most_once(tmp_path):
    """One host sync in a whole training step: the gradient norm and the inf/nan verdict (which
    decide on every rank whether to update) and, in the same copy, the loss and the largest
    peak memory the step logs. The record still holds them: equal on every rank."""
    results = run_distributed(_count_host_syncs, world_size=4, args=(str(tmp_path),),
                              timeout_s=240)
    for r in results:
        assert r["microbatches"] == 4
        assert r["calls"] == [["tolist"]], r["calls"]
    for key in ("loss", "grad_norm", "peak_memory_gb_max_rank"):
        values = {r["records"][0][key] for r in results}
        assert len(values) == 1 and all(math.isfinite(v) and v > 0 for v in values), (key, values)


def test_steps_that_log_nothing_sync_the_host_once_too(tmp_path):
    """logging.metrics_interval=4: steps 2, 3, 6 and 7 write no record, and read the device
    once all the same (the host decides their inf/nan skip), as do steps 4 and 8, whose records
    carry the interval's aggregates."""
    results = run_distributed(_count_host_syncs, world_size=4, timeout_s=240,
                              args=(str(tmp_path), ("logging.metrics_interval=4",), 8))
    for r in results:
        assert r["calls"] == [["tolist"]] * 7, r["calls"]
        assert [rec is not None for rec in r["records"]] == [False, False, True, False, False,
                                                             False, True]
        assert r["adam_steps"] == 8
    for key in ("loss", "loss_mean", "grad_norm"):
        values = {r["records"][-1][key] for r in results}
        assert len(values) == 1 and all(math.isfinite(v) and v > 0 for v in values), (key, values)


def test_fp16_steps_sync_the_host_once(tmp_path):
    """fp16 at logging.metrics_interval=4: the loss scale is decided on the device (halved on
    the first step's overflow, nanomt.optim.loss_scaler) and read with the step's other values,
    so the same one sync per step as fp32; the records log the scale."""
    results = run_distributed(_count_host_syncs, world_size=4, timeout_s=240,
                              args=(str(tmp_path), ("train.precision=fp16",
                                                    "logging.metrics_interval=4"), 8))
    for r in results:
        assert r["calls"] == [["tolist"]] * 7, r["calls"]
        scales = [rec["loss_scale"] for rec in r["records"] if rec is not None]
        assert all(type(s) is float and 1 <= s <= 2.0**16 for s in scales), scales
    assert len({tuple(rec["loss_scale"] for rec in r["records"] if rec is not None)
                for r in results}) == 1  # the same scale on every rank


def test_more_reductions_in_flight_change_nothing_but_the_timing(traffic):
    """parallel.reduce_in_flight_mb=64 (every bucket's reduce-scatter in flight) against the
    default bound of one bucket: the same traffic, gradient norm and updated weights."""
    for rank_result in traffic:
        wide, default = rank_result[(2, 4, "wide")], rank_result[(2, 4, "step")]
        assert wide["bytes"] == default["bytes"] and wide["norm"] == default["norm"]
        for a, b in zip(wide["weights"], default["weights"]):
            assert torch.equal(a, b)


# ---- the parameters' all-gather overlapped with the next forward ------------------------------
def _overlap_param_gather_runs(run_root: str) -> dict:
    """pp=2 x dp=2, GPT (tied embedding: the last stage's head reads a copy it never looks up)
    and Llama (untied head: a weight read without calling its module), ZeRO-1 and ZeRO-2,
    parallel.overlap_param_gather off and on: three steps through nanomt.train.run (losses,
    norms, saved weights); then, inside one ZeRO-2 run per style, the gathers a step leaves in
    flight, the forward that waits for them, and whether the head's weight was still in flight
    when the head ran."""
    from safetensors.torch import load_file

    from nanomt.model.gpt import GPT

    out = {}
    for style in ("gpt", "llama"):
        for stage in (1, 2):
            for overlap in (False, True):
                folder = Path(run_root) / f"{style}_stage{stage}_{overlap}"
                run_layout(folder, style, stage, overlap, steps=3)
                records = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
                weights = {path.name: load_file(path) for path in
                           sorted((folder / "checkpoints").glob("step_*/*.safetensors"))}
                out[(style, stage, overlap)] = {
                    "trajectory": [(r["loss"], r["grad_norm"]) for r in records],
                    "weights": weights}
        out[style] = _inside_an_overlapped_step(Path(run_root) / f"{style}_inside", style, GPT)
    return out


def run_layout(folder: Path, style: str, stage: int, overlap: bool, steps: int) -> None:
    from nanomt.train import run

    run(compose_config(TINY + _overlap_layout(style, stage, overlap) + [
        f"train.steps={steps}", f"checkpoint.interval={steps}"]), folder)


def _overlap_layout(style: str, stage: int, overlap: bool) -> list[str]:
    return ["parallel.pp=2", "parallel.dp=2", f"model.style={style}",
            f"parallel.zero_stage={stage}", "train.global_batch_size=8",
            f"parallel.overlap_param_gather={str(overlap).lower()}"]


def _inside_an_overlapped_step(folder: Path, style: str, GPT) -> dict:
    from nanomt.memory import PeakMemoryMeter
    from nanomt.trainer import setup

    t = setup(compose_config(TINY + _overlap_layout(style, 2, True) + ["train.steps=2"]), folder)
    buffer = t.optimizer.buffer
    gathers, head_saw_pending = buffer.param_gathers, []
    original_head = GPT.head

    def head(model, hidden):
        bucket = buffer.bucket_of[id(model.output_weight())]
        head_saw_pending.append(bucket.index in gathers.pending)
        return original_head(model, hidden)

    GPT.head = head
    try:
        t.train_step(0, PeakMemoryMeter())
        in_flight_after_step = len(gathers.pending)
        t.train_step(1, PeakMemoryMeter())  # its forward waits for each bucket's gather
    finally:
        GPT.head = original_head
    return {"in_flight_after_step": in_flight_after_step, "num_buckets": len(buffer.buckets),
            "waited_in_forward": gathers.waited_in_forward, "head_saw_pending": head_saw_pending,
            "last_stage": t.grid.is_last_stage}


def test_overlapped_parameter_gather_changes_nothing_but_the_timing(tmp_path):
    results = run_distributed(_overlap_param_gather_runs, world_size=4, args=(str(tmp_path),),
                              timeout_s=400)
    for r in results:
        for style in ("gpt", "llama"):
            for stage in (1, 2):
                off, on = r[(style, stage, False)], r[(style, stage, True)]
                assert on["trajectory"] == off["trajectory"] and len(on["trajectory"]) == 3
                assert on["weights"].keys() == off["weights"].keys() and on["weights"]
                for name, tensors in off["weights"].items():
                    for key, tensor in tensors.items():
                        assert torch.equal(on["weights"][name][key], tensor), (style, name, key)
            inside = r[style]
            # the step returns with every bucket's gather in flight; the next forward claims
            # each, the head's weight (read without calling its module) before the head runs
            assert inside["num_buckets"] > 1
            assert inside["in_flight_after_step"] == inside["num_buckets"]
            assert inside["waited_in_forward"] == inside["num_buckets"]
            if inside["last_stage"]:
                assert inside["head_saw_pending"] and not any(inside["head_saw_pending"])
