"""Pipeline parallelism: schedules against the papers' orders, gradients against one process.

Two spawns of four gloo ranks run every distributed check: loss and every gradient of pp in
{2, 4} x v in {1, 2} x m in {4, 8} (and GPipe, and pp=2 x tp=2 with and without sequence
parallelism) against the single-process model, the per-rank order of passes the engine actually
ran, the peak number of micro-batches in flight, clear errors instead of hangs, and 10-step loss
trajectories of nanomt.train.run against the single-process run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from nanomt.model import GPT, ModelConfig
from nanomt.parallel.param_info import param_info
from nanomt.parallel.pipeline.engine import deallocate_output
from nanomt.parallel.pipeline.p2p import Transfer
from nanomt.parallel.pipeline.posting import (
    ACTIVATION,
    GRADIENT,
    Unit,
    checked_plans,
    communication_plan,
    queue_of,
    replay,
    with_waits,
)
from nanomt.parallel.pipeline.schedules import (
    PipelineOp,
    check_pipeline_config,
    one_f_one_b_order,
    schedule_order,
    schedule_orders,
)
from nanomt.testing import run_distributed

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


def test_clear_errors_for_bad_pipelines():
    with pytest.raises(ValueError, match="multiple of parallel.pp"):
        check_pipeline_config(8, pp=4, virtual_stages=2, num_microbatches=6)
    with pytest.raises(ValueError, match="lower parallel.virtual_stages"):
        check_pipeline_config(8, pp=4, virtual_stages=4, num_microbatches=8)
    with pytest.raises(ValueError, match="not divisible"):
        check_pipeline_config(6, pp=4, virtual_stages=1, num_microbatches=8)
    with pytest.raises(ValueError, match="parallel.schedule"):
        check_pipeline_config(8, pp=4, virtual_stages=1, num_microbatches=8, schedule="zb")
    # Rank 1 runs backward 0 before its forward; rank 0 waits for that backward's gradient.
    last_stage = one_f_one_b_order(2, 1, 4)
    bad = [one_f_one_b_order(2, 0, 4), [last_stage[1], last_stage[0]] + last_stage[2:]]
    bad_plans = [communication_plan(order, rank, 2, 1, 4) for rank, order in enumerate(bad)]
    with pytest.raises(ValueError, match=r"would deadlock: rank 0 in the activation messages "
                                         r"posted after F1 .*, rank 1 at B0 \(its inputs never "
                                         r"arrive\)"):
        replay(bad_plans, virtual_stages=1)
    # The same orders with their messages buffered without limit (no transfers): the data alone.
    data_only = [[Unit((op,), ()) for op in order] for order in bad]
    with pytest.raises(ValueError, match=r"rank 0 at B0 \(its inputs never arrive\), rank 1 at "
                                         r"B0"):
        replay(data_only, virtual_stages=1)


# ---- nanomt's model of NCCL's blocking rules (posting.replay), on the engine's messages ------
NCCL_CASES = [(schedule, pp, v, m, forward_only)
              for schedule in ("1f1b", "gpipe") for pp in (2, 3, 4, 8) for v in (1, 2, 3)
              for m in ((1, 2, 3, 5, pp, 2 * pp) if v == 1 else (pp, 2 * pp, 3 * pp))
              for forward_only in (False, True)]


def on_one_queue(plan):
    """The same batches, all on one in-order queue per rank (the activations' communicator)."""
    return with_waits([dataclasses.replace(unit, queue=ACTIVATION) for unit in plan])


def receive_posted_before(plan) -> dict[int, tuple[int, int]]:
    """For each pass (by its position in the rank's order) whose input comes from a neighbour:
    (index of the unit that posts its receive, index of the unit that runs the pass)."""
    runs = [u for u, unit in enumerate(plan) if unit.passes]
    posts = {t.op: u for u, unit in enumerate(plan) for t in unit.transfers if not t.is_send}
    return {x: (posts[plan[u].passes[0]], u) for x, u in enumerate(runs)
            if plan[u].passes[0] in posts}


def test_two_queues_receive_ahead_for_every_schedule():
    """Every schedule's units, each receive posted a pass ahead on its own queue, complete under
    replay's model of NCCL's rules (docs/pipeline.md): 1F1B, interleaved, GPipe, forward-only,
    pp 2/3/4/8, v 1/2/3, m from 1 to 3p. A model: no NCCL runs here."""
    for schedule, pp, v, m, forward_only in NCCL_CASES:
        plans = checked_plans(schedule, pp, m, v, forward_only)
        assert len(plans) == pp
        for plan in plans:
            assert all(len(unit.passes) <= 1 for unit in plan)  # a unit after every pass
            for unit in plan:  # activations on one queue, gradients on the other
                assert all(queue_of(t) == unit.queue for t in unit.transfers)
                assert len({plan[w].queue for w in unit.wait_for}) == len(unit.wait_for)
            order = [unit.passes[0] for unit in plan if unit.passes]
            runs = [u for u, unit in enumerate(plan) if unit.passes]
            for x, (posted, ran) in receive_posted_before(plan).items():
                # ahead: the receive went out before the pass before it ran, with one chunk per
                # rank always; interleaved where the pass before is of the other kind
                if x > 0 and (v == 1 or order[x - 1].kind != order[x].kind):
                    assert posted < runs[x - 1], (schedule, pp, v, m, x)
                assert posted in plan[ran].wait_for  # the pass waits for that unit, and
                others = [w for w in plan[ran].wait_for if w != posted]  # a backward may free
                assert not others or (order[x].kind == "B" and plan[others[0]].queue == ACTIVATION)
    assert {unit.queue for plan in checked_plans("1f1b", 4, 8, 2, False)
            for unit in plan if unit.transfers} == {ACTIVATION, GRADIENT}


def test_receiving_ahead_needs_two_queues():
    """On one in-order queue per rank the same batches are a cycle (docs/pipeline.md): 1F1B and
    GPipe always, interleaved 1F1B when m = p. Forward-only plans use one queue anyway."""
    for schedule, pp, m, v in [("1f1b", 2, 4, 1), ("1f1b", 4, 8, 1), ("gpipe", 4, 8, 1),
                               ("gpipe", 2, 4, 2), ("1f1b", 2, 2, 2), ("1f1b", 4, 4, 3)]:
        plans = checked_plans(schedule, pp, m, v, False)
        with pytest.raises(ValueError, match="NCCL would never match them"):
            replay([on_one_queue(plan) for plan in plans], v)
    replay([on_one_queue(plan) for plan in checked_plans("1f1b", 4, 8, 2, True)], 2)


def test_replay_catches_broken_two_queue_plans():
    """Interleaved, a receive may not go ahead of the send before it on its queue: two passes
    ahead closes a cycle through the chunks' ring even on two queues. And batches swapped on
    one queue are matched out of order."""
    for pp, m, v, forward_only in [(2, 2, 2, True), (2, 4, 2, False), (4, 8, 2, False)]:
        orders = schedule_orders("1f1b", pp, m, v, forward_only)
        two_ahead = [communication_plan(order, rank, pp, v, m,
                                        points=[max(x - 2, -1) for x in range(len(order))])
                     for rank, order in enumerate(orders)]
        with pytest.raises(ValueError, match=r"rank 0 in the activation messages .*rank 1"):
            replay(two_ahead, v)
    plans = [list(plan) for plan in checked_plans("1f1b", 4, 8, 1, False)]
    grads = [u for u, unit in enumerate(plans[1]) if unit.queue == GRADIENT and unit.transfers]
    first, second = grads[0], grads[1]
    plans[1][first], plans[1][second] = plans[1][second], plans[1][first]
    with pytest.raises(ValueError, match="on the gradient queue would be matched out of order"):
        replay(plans, 1)


def test_posting_model_catches_cycles_and_misordered_matches():
    op = PipelineOp("F", 0)
    # Both ranks send first and post the matching receive only in a later unit: a cycle.
    cycle = [[Unit((), (Transfer(True, op, 1, 0),)), Unit((op,), (Transfer(False, op, 1, 1),))],
             [Unit((), (Transfer(True, op, 0, 1),)), Unit((op,), (Transfer(False, op, 0, 0),))]]
    with pytest.raises(ValueError, match="rank 0 .*rank 1"):
        replay(cycle, virtual_stages=1)
    swapped = [[Unit((), (Transfer(True, op, 1, 0), Transfer(True, op, 1, 2)))],
               [Unit((), (Transfer(False, op, 0, 2), Transfer(False, op, 0, 0)))]]
    with pytest.raises(ValueError, match="out of order"):
        replay(swapped, virtual_stages=1)
    # Each rank's first unit receives what the other sends in its second: both queues stuck.
    receive_0, send_0 = Transfer(False, op, 1, 0), Transfer(True, op, 1, 1)
    receive_1, send_1 = Transfer(False, op, 0, 1), Transfer(True, op, 0, 0)
    crossed = [[Unit((), (receive_0,)), Unit((), (send_0,), wait_for=())],
               [Unit((), (receive_1,)), Unit((), (send_1,), wait_for=())]]
    with pytest.raises(ValueError, match="rank 0 in the activation messages .*rank 1 in the"):
        replay(crossed, virtual_stages=1)
    # On two queues (rank 0 sends on the other, rank 1 receives on it) nothing waits in line.
    replay([[Unit((), (receive_0,)), Unit((), (send_0,), GRADIENT, ())],
            [Unit((), (receive_1,), GRADIENT), Unit((), (send_1,), wait_for=())]], 1)


def test_passes_wait_only_for_their_own_receives():
    """1F1B's first stage receives nothing for its forwards: each runs while earlier messages
    are on the wire; a backward waits for its gradient's unit, and for the activation units
    that sent the outputs of backwards already run (done, so free: their outputs are freed).
    The last stage: a forward waits for its activation's unit, a backward starts from the loss."""
    first, last = checked_plans("1f1b", 4, 8, 1, False)[0], checked_plans("1f1b", 4, 8, 1, False)[3]
    ran = set()
    for unit in first:
        if unit.passes:
            op = unit.passes[0]
            assert (unit.wait_for == ()) == (op.kind == "F"), unit
            ran.add(op)
            for w in unit.wait_for:
                assert first[w].queue == GRADIENT or all(
                    t.is_send and PipelineOp("B", t.op.microbatch) in ran
                    for t in first[w].transfers), (unit, first[w])
    assert any(first[w].queue == ACTIVATION for unit in first for w in unit.wait_for)
    for unit in last:
        if unit.passes:
            assert (unit.wait_for == ()) == (unit.passes[0].kind == "B"), unit
            assert all(last[w].queue == ACTIVATION for w in unit.wait_for), unit


def test_gpipe_interleaved_needs_whole_groups_and_views_are_not_freed():
    with pytest.raises(ValueError, match="multiple of parallel.pp"):
        check_pipeline_config(8, pp=4, virtual_stages=2, num_microbatches=6, schedule="gpipe")
    with pytest.raises(ValueError, match="multiple of parallel.pp"):
        schedule_order("gpipe", 4, 0, 6, 2)
    with pytest.raises(AssertionError):
        deallocate_output(torch.ones(4)[:2])  # freeing a view would free nothing


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
    loss_sum = forward_backward_no_pipelining(model, make_micro_batches(m))
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


def one_work_per_batch(ops, one_per_op):
    """Mimics NCCL's batch_isend_irecv on gloo: ONE work for the whole batch (gloo returns one
    per op)."""
    class CoalescedWork:
        def __init__(self, works):
            self.works = works

        def wait(self):
            return all(work.wait() for work in self.works)

        def is_completed(self):
            return all(work.is_completed() for work in self.works)

    return [CoalescedWork(one_per_op(ops))]


class SavedActivationMeter:
    """Independent of the engine's counters: the bytes of tensors autograd saves for backward
    (parameters excluded), counted while alive (weakref finalizers), and their peak."""

    def __init__(self, params):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.bytes = self.peak = 0

    def pack(self, tensor):
        import weakref

        ptr = tensor.untyped_storage().data_ptr()
        if ptr in self.param_ptrs or tensor.numel() == 0:
            return tensor
        entry = self.live.setdefault(ptr, [0, tensor.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        weakref.finalize(tensor, self.release, ptr)
        return tensor

    def release(self, ptr):
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[ptr]


def run_case(grid, tp: int, pp: int, v: int, m: int, refs, schedule="1f1b", sp=False,
             cfg: ModelConfig = CFG) -> dict:
    from nanomt.model.chunks import build_model_chunks
    from nanomt.parallel import comm
    from nanomt.parallel.data_parallel import GradientBuffer, finalize_grads
    from nanomt.parallel.pipeline import PipelineStats, forward_backward_pipelining

    chunks = build_model_chunks(cfg, grid, v, seed=SEED, sequence_parallel=sp)
    # Gradients go where training puts them: the data-parallel buffer (every dp rank runs the
    # same micro-batches here, so the dp average changes nothing), completed by finalize_grads
    # (sequence-parallel sums over tp, the tied embedding over the first and last stage).
    buffer = GradientBuffer(chunks, grid, zero_stage=0, num_microbatches=m)
    stats = PipelineStats()
    meter = SavedActivationMeter([p for chunk in chunks for p in chunk.parameters()])
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda tensor: tensor):
        loss_sum = forward_backward_pipelining(chunks, make_micro_batches(m), grid,
                                               schedule=schedule, stats=stats)
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
    from nanomt.parallel import comm
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
    # pp=2 x tp=2: what every rank sends between stages and gathers over tp, from comm's log.
    for v in (1, 2):
        with comm.traffic_log() as log:
            out[("pp2tp2", v, 4)] = run_case(pp2_tp2, 2, 2, v, 4, refs)
        out[f"traffic_v{v}"] = [(r.kind, r.group, r.numel, r.nbytes) for r in log]
    with comm.traffic_log() as log:
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
            activations = m * sum(k < 2 * v - 1 for k in chunks)  # on pp_group
            gradients = m * sum(k > 0 for k in chunks)  # on pp_grad_group
            messages = activations + gradients
            log = r[f"traffic_v{v}"]
            sends = [rec for rec in log if rec[0] == "send"]
            assert sorted(rec[1:] for rec in sends) == sorted(
                [("pp", full // tp, full // tp * 4)] * activations
                + [("pp_grad", full // tp, full // tp * 4)] * gradients)
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
