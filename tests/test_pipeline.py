"""Pipeline parallelism: schedules against the papers' orders, gradients against one process.

Without processes: the orders against the papers' (the message plans against NCCL's ordering
rule: test_pipeline_posting.py). Two spawns of four gloo ranks run every distributed check:
loss and every gradient of pp in {2, 4} x v in {1, 2} x m in {4, 8} (and GPipe, and pp=2 x
tp=2 with and without sequence parallelism) against the single-process model, the per-rank
order of passes the engine actually ran, the peak number of micro-batches in flight (recorded
by tests/pipeline_probes.py), clear errors instead of hangs, and 10-step loss trajectories of
nanomt.train.run against the single-process run.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanomt.errors import ConfigError
from nanomt.model import GPT, ModelConfig
from nanomt.parallel.param_info import param_info
from nanomt.parallel.pipeline.engine import deallocate_output
from nanomt.parallel.pipeline.posting import Exchange, plans_from_slots, replay
from nanomt.parallel.pipeline.schedules import passes, schedule_order
from nanomt.testing import run_distributed
from comm_counting import traffic_log
from pipeline_probes import SavedActivationMeter, one_work_per_batch, recording_pipeline

CFG = ModelConfig(num_layers=8, hidden_size=32, num_heads=4, seq_len=16, vocab_size=64)
MICRO_BATCH = 2
TRAIN_OVERRIDES = ["model.num_layers=4", "model.hidden_size=32", "model.num_heads=4",
                   "model.seq_len=16", "train.steps=10", "train.global_batch_size=8",
                   "train.micro_batch_size=1", "train.eval_interval=5", "train.eval_batches=4",
                   "train.progress_bar=false", "optim.warmup_steps=2", "optim.lr=3e-3"]


# ---- the papers' orders, written independently of nanomt's schedules -------------------------
def paper_1f1b(pp: int, rank: int, m: int) -> list[str]:
    """PipeDream-Flush (Narayanan et al. 2021, fig. 3): p-r-1 warm-up forwards, then 1F1B."""
    warm = min(pp - rank - 1, m)
    forwards = [f"F{i}" for i in range(m)]
    backwards = [f"B{i}" for i in range(m)]
    steady = [op for pair in zip(forwards[warm:], backwards) for op in pair]
    return forwards[:warm] + steady + backwards[m - warm:]


def paper_interleaved(pp: int, rank: int, m: int, v: int) -> list[str]:
    """Interleaved 1F1B (Narayanan et al. 2021, fig. 4 and Megatron's warm-up count)."""
    def name(kind: str, mb: int, chunk: int) -> str:
        return f"{kind}{mb}" + (f".{chunk}" if chunk else "")

    forwards, backwards = [], []
    for group in range(m // pp):  # micro-batches go in groups of p, chunk after chunk
        mbs = range(group * pp, (group + 1) * pp)
        forwards += [name("F", mb, c) for c in range(v) for mb in mbs]
        backwards += [name("B", mb, c) for c in reversed(range(v)) for mb in mbs]
    warm = min(2 * (pp - rank - 1) + (v - 1) * pp, m * v)
    steady = [op for pair in zip(forwards[warm:], backwards) for op in pair]
    return forwards[:warm] + steady + backwards[m * v - warm:]


# From the paper's figure 4 (p=4, m=8, v=2), device 1: ten warm-up forwards, then 1F1B.
FIGURE_4_DEVICE_1 = ("F0 F1 F2 F3 F0.1 F1.1 F2.1 F3.1 F4 F5 "
                     "F6 B0.1 F7 B1.1 F4.1 B2.1 F5.1 B3.1 F6.1 B0 F7.1 B1 "
                     "B2 B3 B4.1 B5.1 B6.1 B7.1 B4 B5 B6 B7").split()
FIGURE_3_DEVICE_1 = "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7".split()


# Every device of the two figures (p=4, m=8; v=2 for figure 4), as literal rows: device d is
# pipeline rank d-1, the paper's micro-batch i is i-1 here, ".1" marks the second chunk.
FIGURE_3 = ["F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
            "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
            "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
            "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7"]
FIGURE_4 = [
    "F0 F1 F2 F3 F0.1 F1.1 F2.1 F3.1 F4 F5 F6 B0.1 F7 B1.1 F4.1 B2.1 F5.1 B3.1 F6.1 B0 F7.1 B1 "
    "B2 B3 B4.1 B5.1 B6.1 B7.1 B4 B5 B6 B7",
    "F0 F1 F2 F3 F0.1 F1.1 F2.1 F3.1 F4 B0.1 F5 B1.1 F6 B2.1 F7 B3.1 F4.1 B0 F5.1 B1 F6.1 B2 "
    "F7.1 B3 B4.1 B5.1 B6.1 B7.1 B4 B5 B6 B7",
    "F0 F1 F2 F3 F0.1 F1.1 F2.1 B0.1 F3.1 B1.1 F4 B2.1 F5 B3.1 F6 B0 F7 B1 F4.1 B2 F5.1 B3 "
    "F6.1 B4.1 F7.1 B5.1 B6.1 B7.1 B4 B5 B6 B7",
    "F0 F1 F2 F3 F0.1 B0.1 F1.1 B1.1 F2.1 B2.1 F3.1 B3.1 F4 B0 F5 B1 F6 B2 F7 B3 F4.1 B4.1 "
    "F5.1 B5.1 F6.1 B6.1 F7.1 B7.1 B4 B5 B6 B7"]


def test_orders_match_the_papers():
    assert [str(op) for op in schedule_order("1f1b", 4, 0, 8, 2)] == FIGURE_4_DEVICE_1
    assert [str(op) for op in schedule_order("1f1b", 4, 0, 8, 1)] == FIGURE_3_DEVICE_1
    for rank in range(4):
        assert [str(op) for op in schedule_order("1f1b", 4, rank, 8, 1)] == FIGURE_3[rank].split()
        assert [str(op) for op in schedule_order("1f1b", 4, rank, 8, 2)] == FIGURE_4[rank].split()
    for pp, m, v in [(4, 8, 1), (4, 8, 2), (2, 4, 2), (4, 12, 3), (2, 6, 1)]:
        for rank in range(pp):
            expected = paper_1f1b(pp, rank, m) if v == 1 else paper_interleaved(pp, rank, m, v)
            assert [str(op) for op in schedule_order("1f1b", pp, rank, m, v)] == expected


def check_layout(*overrides: str, world_size: int = 4):
    from nanomt.config import check_config
    from nanomt.testing import compose_config

    return check_config(compose_config(["train.micro_batch_size=1", *overrides]), world_size)


def test_clear_errors_for_bad_pipelines():
    """Config validation states each pipeline rule once; the schedules trust it."""
    with pytest.raises(ConfigError, match="multiple of parallel.pp"):
        check_layout("model.num_layers=8", "parallel.pp=4", "parallel.virtual_stages=2",
                     "train.global_batch_size=6")
    with pytest.raises(ConfigError, match="multiple of parallel.pp"):  # GPipe interleaved too
        check_layout("model.num_layers=8", "parallel.pp=4", "parallel.virtual_stages=2",
                     "parallel.schedule=gpipe", "train.global_batch_size=6")
    with pytest.raises(ConfigError, match="virtual_stages = 4 . 4 = 16"):  # too few layers
        check_layout("model.num_layers=8", "parallel.pp=4", "parallel.virtual_stages=4",
                     "train.global_batch_size=8")
    with pytest.raises(ConfigError, match="not divisible"):
        check_layout("model.num_layers=6", "parallel.pp=4", "train.global_batch_size=8")
    with pytest.raises(ConfigError, match="parallel.schedule"):
        check_layout("parallel.pp=4", "parallel.schedule=zb", "train.global_batch_size=8")
    # Rank 1 runs backward 0 before its forward; rank 0 waits for that backward's gradient.
    last_stage = schedule_order("1f1b", 2, 1, 4)
    bad = [schedule_order("1f1b", 2, 0, 4), [last_stage[1], last_stage[0]] + last_stage[2:]]
    bad_plans = plans_from_slots([[(op,) for op in order] for order in bad], 1, 4)
    with pytest.raises(ValueError, match=r"would deadlock: rank 0 waits for rank 1 in its batch "
                                         r"before F1, rank 1 at B0 \(its inputs never arrive\)"):
        replay(bad_plans, virtual_stages=1)
    # The same orders with their messages buffered without limit (no transfers): the data alone.
    data_only = [[Exchange((), (op,)) for op in order] for order in bad]
    with pytest.raises(ValueError, match=r"rank 0 at B0 \(its inputs never arrive\), rank 1 at "
                                         r"B0"):
        replay(data_only, virtual_stages=1)


def test_views_are_not_freed():
    with pytest.raises(AssertionError):
        deallocate_output(torch.ones(4)[:2])  # freeing a view would free nothing
    output = torch.ones(3, 4, requires_grad=True) * 2
    deallocate_output(output)  # the data goes, the shape and the graph stay
    assert output.shape == (3, 4) and output.untyped_storage().nbytes() == 4
    torch.autograd.backward(output, torch.ones(3, 4))


def test_dropout_masks_differ_across_stages_and_chunks():
    """Each chunk's tensor-parallel stream is its own: the attention dropout of pipeline stage
    (or virtual chunk) 1 does not repeat stage 0's masks."""
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_heads=4, seq_len=16, vocab_size=64,
                      dropout=0.1)
    chunks = [GPT(cfg, None, seed=SEED, layer_range=range(k, k + 1), pre_process=k == 0,
                  post_process=k == 3) for k in range(4)]
    masks = []
    for chunk in chunks:
        with chunk.rng.fork():
            masks.append(torch.rand(64))
    assert all(not torch.equal(masks[0], mask) for mask in masks[1:])


# ---- distributed: gradients, executed orders, memory, errors ----------------------------------
SEED = 1234


def make_micro_batches(m: int, seed: int = 0, batch: int = MICRO_BATCH):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (m, batch, CFG.seq_len + 1), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


LLAMA_CFG = ModelConfig(style="llama", num_layers=4, hidden_size=32, num_heads=4, seq_len=16,
                        vocab_size=64, ffn_hidden_size=64)


def reference(m: int, cfg: ModelConfig = CFG) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of the single-process model (plain gradient accumulation)."""
    from nanomt.parallel.no_pipelining import forward_backward_no_pipelining

    model = GPT(cfg, None, seed=SEED)
    loss_sum = forward_backward_no_pipelining([model], make_micro_batches(m))
    return loss_sum / m, {name: p.grad.clone() for name, p in model.named_parameters()}


def compare_grads(chunks, ref_grads, tp_rank: int, tp: int,
                  buffer=None) -> tuple[float, list[str]]:
    """Largest relative error of this rank's gradients (param.grad, or where a ZeRO-0
    GradientBuffer holds them) against its shards of the reference."""
    worst, names = 0.0, []
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            full_name = param_info(param).name
            expected = ref_grads[full_name]
            dim = param_info(param).tp_split_dim
            if dim is not None:
                expected = expected.chunk(tp, dim=dim)[tp_rank]
            grad = param.grad
            if buffer is not None:
                offset = buffer.offset_of[id(param)]
                flat = buffer.bucket_of[id(param)].grad_buffer
                grad = flat[offset: offset + param.numel()].view_as(param)
            err = (grad - expected).norm() / expected.norm().clamp_min(1e-12)
            worst, names = max(worst, float(err)), names + [full_name]
    return worst, names


def run_case(grid, tp: int, pp: int, v: int, m: int, refs, schedule="1f1b", sp=False,
             cfg: ModelConfig = CFG) -> dict:
    from nanomt.model.chunks import build_model_chunks
    from nanomt.parallel import comm
    from nanomt.parallel.data_parallel import GradientBuffer, finalize_grads
    from nanomt.parallel.forward_backward import get_forward_backward_func

    chunks = build_model_chunks(cfg, grid, v, seed=SEED, sequence_parallel=sp, schedule=schedule)
    # Gradients go where training puts them: the data-parallel buffer (every dp rank runs the
    # same micro-batches here, so the dp average changes nothing), completed by finalize_grads
    # (sequence-parallel sums over tp, the tied embedding over the first and last stage).
    buffer = GradientBuffer(chunks, grid, zero_stage=0, num_microbatches=m)
    meter = SavedActivationMeter([p for chunk in chunks for p in chunk.parameters()])
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda tensor: tensor), \
            recording_pipeline() as recording:
        forward_backward = get_forward_backward_func(SimpleNamespace(pp=pp), schedule)
        loss_sum = forward_backward(chunks, make_micro_batches(m), grid)
    stats = recording.last
    finalize_grads(buffer)
    loss = (loss_sum / m).reshape(1)
    comm.all_reduce(loss, grid.pp_group)  # only the last stage holds it
    ref_loss, ref_grads = refs[(cfg.style, m)]
    worst, names = compare_grads(chunks, ref_grads, grid.tp_rank, tp, buffer)
    return {"loss_err": abs(float(loss) - float(ref_loss)) / float(ref_loss),
            "grad_err": worst, "names": names, "order": stats.op_order,
            "peak": stats.peak_in_flight, "sent": stats.outputs_sent,
            "saved_peak_bytes": meter.peak, "saved_left_bytes": meter.bytes,
            "freed": stats.outputs_freed, "unfreed_bytes": stats.peak_unfreed_output_bytes,
            "pp_rank": grid.pp_rank, "dp_rank": grid.dp_rank, "tp_rank": grid.tp_rank}


def expect_error(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


def _pipeline_checks(refs) -> dict:
    import unittest.mock

    from nanomt.model.chunks import build_model_chunks
    from nanomt.parallel.grid import ParallelGrid
    from nanomt.parallel.pipeline import forward_backward_pipelining

    pp4 = ParallelGrid(tp=1, pp=4, dp=1)
    pp2_dp2 = ParallelGrid(tp=1, pp=2, dp=2)
    pp2_tp2 = ParallelGrid(tp=2, pp=2, dp=1)
    out = {}
    for v in (1, 2):
        for m in (4, 8):
            out[("pp4", v, m)] = run_case(pp4, 1, 4, v, m, refs)
            out[("pp2", v, m)] = run_case(pp2_dp2, 1, 2, v, m, refs)
    out[("gpipe", 2, 8)] = run_case(pp4, 1, 4, 2, 8, refs, schedule="gpipe")
    out[("gpipe", 1, 8)] = run_case(pp4, 1, 4, 1, 8, refs, schedule="gpipe")
    # pp=2 x tp=2: what every rank sends between stages and gathers over tp, from the traffic log.
    for v in (1, 2):
        with traffic_log() as log:
            out[("pp2tp2", v, 4)] = run_case(pp2_tp2, 2, 2, v, 4, refs)
        out[f"traffic_v{v}"] = [(r.kind, r.group, r.numel, r.nbytes) for r in log]
    with traffic_log() as log:
        out[("pp2tp2sp", 2, 8)] = run_case(pp2_tp2, 2, 2, 2, 8, refs, sp=True)
    out["traffic_sp"] = [(r.kind, r.group, r.numel, r.nbytes) for r in log]
    # Untied embeddings (llama): nothing to sum over the embedding group, two steps in a row.
    run_case(pp2_dp2, 1, 2, 1, 4, refs, cfg=LLAMA_CFG)
    out[("llama_pp2", 1, 4)] = run_case(pp2_dp2, 1, 2, 1, 4, refs, cfg=LLAMA_CFG)
    # One work per batch (as NCCL returns, mimicked on gloo): every sent output is freed.
    one_per_op = torch.distributed.batch_isend_irecv
    with unittest.mock.patch("torch.distributed.batch_isend_irecv",
                             lambda ops: one_work_per_batch(ops, one_per_op)):
        out[("one_work_per_batch", 2, 8)] = run_case(pp4, 1, 4, 2, 8, refs)

    # Ranks that disagree on the schedule fail together instead of waiting on each other.
    # (Signatures are agreed on once and cached: use micro-batch counts not run above.)
    chunks = build_model_chunks(CFG, pp4, 1, seed=SEED)
    m = 5 if pp4.pp_rank == 0 else 6
    out["mismatched_m"] = expect_error(
        lambda: forward_backward_pipelining(chunks, make_micro_batches(m), pp4))
    batch = 1 if pp4.is_last_stage else 2
    out["mismatched_shape"] = expect_error(
        lambda: forward_backward_pipelining(chunks, make_micro_batches(7, batch=batch), pp4))
    return out


def check_scatter_gather_traffic(results) -> None:
    """Without SP every tp rank sends 1/t of each [s, b, h] message (Megatron's scatter-gather)
    and the receiver all-gathers the t pieces over tp; under SP the [s/t, b, h] shard travels
    whole. Counted from comm's traffic log on every rank."""
    tp, full = 2, CFG.seq_len * MICRO_BATCH * CFG.hidden_size  # s*b*h elements
    for r in results:
        pp_rank = r[("pp2tp2", 1, 4)]["pp_rank"]
        for v, m in ((1, 4), (2, 4)):
            chunks = [c * 2 + pp_rank for c in range(v)]  # global chunks on this pp rank
            activations = m * sum(k < 2 * v - 1 for k in chunks)
            gradients = m * sum(k > 0 for k in chunks)
            messages = activations + gradients
            log = r[f"traffic_v{v}"]
            sends = [rec for rec in log if rec[0] == "send"]  # all on the one pp communicator
            assert sorted(rec[1:] for rec in sends) == [("pp", full // tp, full // tp * 4)] * (
                activations + gradients)
            # before scatter-gather: messages * s*b*h * 4 bytes; now 1/t of that
            assert sum(rec[3] for rec in sends) * tp == messages * full * 4
            gathers = [rec for rec in log if rec[0] == "all_gather" and rec[1] == "tp"]
            assert [rec[2] for rec in gathers] == [full] * messages  # one per received message
        sp_sends = [rec for rec in r["traffic_sp"] if rec[0] == "send"]
        assert sp_sends and all(rec[2] == full // tp for rec in sp_sends)  # the shard, unsplit


def test_pipeline_equals_single_process():
    refs = {("gpt", m): reference(m) for m in (4, 8)}
    refs[("llama", 4)] = reference(4, LLAMA_CFG)
    results = run_distributed(_pipeline_checks, world_size=4, args=(refs,), timeout_s=400)
    for case in results[0]:
        if not isinstance(case, tuple):
            continue
        all_names = set(refs[("llama" if case[0] == "llama_pp2" else "gpt", 4)][1])
        per_rank = [r[case] for r in results]
        for r in per_rank:
            assert r["loss_err"] < 1e-5, (case, r["loss_err"])
            assert r["grad_err"] < 1e-5, (case, r["grad_err"])
            assert r["freed"] == r["sent"], case  # every sent activation was deallocated
        assert set().union(*(r["names"] for r in per_rank)) == all_names, case

    check_scatter_gather_traffic(results)

    # The engine ran the papers' orders (as executed, not just as planned).
    for rank, r in enumerate(results):
        assert r[("pp4", 2, 8)]["order"] == paper_interleaved(4, rank, 8, 2)
        assert r[("pp4", 1, 8)]["order"] == paper_1f1b(4, rank, 8)

    # Memory: 1F1B holds at most p - r micro-batches, GPipe all m; interleaved its warm-up + 1.
    for rank, r in enumerate(results):
        for m in (4, 8):
            assert r[("pp4", 1, m)]["peak"] == min(4 - rank, m) <= 4
            warm = min(2 * (4 - rank - 1) + 4, 2 * m)
            assert r[("pp4", 2, m)]["peak"] == min(warm + 1, 2 * m)
            assert r[("pp4", 2, m)]["peak"] / 2 <= 4 + (4 - 1) / 2  # p + (p-1)/v stage-loads
        assert r[("gpipe", 2, 8)]["peak"] == 16
        assert all(v["saved_left_bytes"] == 0 for c, v in r.items() if isinstance(c, tuple))
        # A sent output's data lives until the next stage has taken it, and never past its
        # micro-batch's backward: the bytes held stay within the in-flight bound.
        activation_bytes = MICRO_BATCH * CFG.seq_len * CFG.hidden_size * 4
        for case, value in r.items():
            if isinstance(case, tuple):
                assert value["unfreed_bytes"] <= value["peak"] * activation_bytes, case
    # Measured independently (autograd's saved tensors): on the first stage 1F1B holds p of the
    # m micro-batches' activations, GPipe all m: a peak about p/m = 1/2 of GPipe's.
    one_f_one_b, gpipe = results[0][("pp4", 1, 8)], results[0][("gpipe", 1, 8)]
    assert gpipe["saved_peak_bytes"] > 0
    peaks = (one_f_one_b["saved_peak_bytes"], gpipe["saved_peak_bytes"])
    assert peaks[0] <= 0.6 * peaks[1], peaks

    for r in results:
        assert "disagree on the schedule" in r["mismatched_m"]
        assert "microbatches=5" in r["mismatched_m"] and "microbatches=6" in r["mismatched_m"]
        assert "batch=1" in r["mismatched_shape"]


# ---- nanomt.train.run through the pipeline: 10-step loss trajectories -------------------------
TRAIN_LAYOUTS = {
    "pp4_1f1b": ["parallel.pp=4"],
    "pp2_tp2_sp_interleaved": ["parallel.pp=2", "parallel.tp=2", "parallel.virtual_stages=2",
                               "parallel.sequence_parallel=true"],
    "pp2_dp2_interleaved": ["parallel.pp=2", "parallel.virtual_stages=2", "train.timeline=true"],
}


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_runs(root: str) -> dict:
    import torch.distributed as dist

    from nanomt.testing import compose_config
    from nanomt.train import run

    out = {}
    for name, overrides in TRAIN_LAYOUTS.items():
        run_dir = Path(root) / name
        run(compose_config(TRAIN_OVERRIDES + overrides), run_dir)
        dist.barrier()
        if dist.get_rank() == 0:
            out[name] = {"metrics": read_metrics(run_dir),
                         "run": json.loads((run_dir / "run.json").read_text())}
    return out


def test_training_through_the_pipeline_matches_one_process():
    import importlib.util

    from nanomt.testing import compose_config
    from nanomt.train import run

    tool = Path(__file__).resolve().parent.parent / "tools" / "pipeline_timeline.py"
    spec = importlib.util.spec_from_file_location("pipeline_timeline", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    draw_timeline = module.main

    with tempfile.TemporaryDirectory() as root:
        run(compose_config(TRAIN_OVERRIDES), Path(root) / "single")
        expected = read_metrics(Path(root) / "single")
        single_params = json.loads((Path(root) / "single" / "run.json").read_text())["ranks"][0][
            "num_parameters"]
        results = run_distributed(_train_runs, world_size=4, args=(root,), timeout_s=400)[0]
        timeline_dir = Path(root) / "pp2_dp2_interleaved" / "timeline"
        timeline_files = sorted(p.name for p in timeline_dir.glob("rank*.json"))
        recorded = [json.loads((timeline_dir / name).read_text()) for name in timeline_files]
        draw_timeline([str(timeline_dir.parent)])  # tools/pipeline_timeline.py
        trace = json.loads((timeline_dir / "trace.json").read_text())
        assert (timeline_dir / "timeline.png").stat().st_size > 10_000
    assert expected[-1]["loss"] < expected[0]["loss"]
    for name, result in results.items():
        got = result["metrics"]
        assert len(got) == 10, name
        for mine, ref in zip(got, expected):
            assert math.isclose(mine["loss"], ref["loss"], rel_tol=1e-5), (name, mine, ref)
            if "val_loss" in ref:  # the validation set is the same under every layout
                assert math.isclose(mine["val_loss"], ref["val_loss"], rel_tol=1e-5), name
        assert all(r["layers"] for r in result["run"]["ranks"]), name

    # run.json: each pipeline rank reports its own chunks; together they are the model plus the
    # last stage's copy of the tied word embedding (padded vocabulary x hidden).
    ranks = results["pp4_1f1b"]["run"]["ranks"]
    assert [r["layers"] for r in ranks] == [[[i, i + 1]] for i in range(4)]
    embedding_copy = 256 * 32
    assert sum(r["num_parameters"] for r in ranks) == single_params + embedding_copy
    assert timeline_files == [f"rank{r}.json" for r in range(4)]
    # Each rank recorded every step, and in each step the passes of its interleaved order.
    for timeline in recorded:
        assert [s["step"] for s in timeline["steps"]] == list(range(1, 11))
        passes = [e for e in timeline["steps"][-1]["events"] if e[0] in ("F", "B")]
        names = [f"{k}{mb}" + (f".{c}" if c else "") for k, mb, c, _, _ in passes]
        assert names == paper_interleaved(2, timeline["pp_rank"], 4, 2)
    assert sum(1 for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] != "wait") == 4 * 16


def test_timeline_keeps_only_the_last_steps(tmp_path):
    from nanomt.parallel.pipeline import Timeline

    timeline = Timeline({"rank": 0}, keep_last=3, cuda_events=False)
    for step in range(1, 8):
        timeline.begin_step(step)
        with timeline.span("F", 0, 0):
            pass
    timeline.save(tmp_path / "rank0.json")
    saved = json.loads((tmp_path / "rank0.json").read_text())
    assert [s["step"] for s in saved["steps"]] == [5, 6, 7]
    assert all(len(s["events"]) == 1 and s["events"][0][:3] == ["F", 0, 0] for s in saved["steps"])
