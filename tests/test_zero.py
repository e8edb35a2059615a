"""ZeRO data parallelism against a single-process torch.optim.AdamW run.

One spawn per layout (dp=2, dp=4, tp=2 x pp=2 x dp=2) trains the tiny model 20 steps at every
ZeRO stage through nanomt.train.run (ZeRO-3 with full activation checkpointing under tp2 x pp2 x
dp2); the test compares each loss and gradient-norm trajectory with a run built from torch alone
in the test process (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_, the same global batches).
The dp=2 spawn also measures the per-rank bytes of parameters, gradients and optimizer state
(PeakMemoryMeter: the storages allocated from the meta-device model on, alive between steps and
at the peak, after backward) against ZeRO's formulas, counts the gradient
reductions of a step in both accumulation modes, and calls finalize_grads() twice.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from nanomt.testing import compose_config, run_distributed

STEPS = 20
FAST = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_len=16",
        "train.global_batch_size=8", "train.micro_batch_size=1", f"train.steps={STEPS}",
        "train.eval_interval=0", "train.eval_batches=1", "train.progress_bar=false",
        "train.measure_memory=false", "optim.warmup_steps=5", "logging.wandb.mode=disabled",
        "parallel.bucket_size_mb=0.02"]  # several buckets per rank even on the tiny model
STAGES = (0, 1, 2, 3)


def trajectory(run_dir: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records], [r["grad_norm"] for r in records]


def _train_every_stage(run_root: str, layout: list[str], extra_runs: dict,
                       per_stage: dict | None = None) -> None:
    from nanomt.train import run

    for stage in STAGES:
        overrides = [f"parallel.zero_stage={stage}"] + (per_stage or {}).get(stage, [])
        run(compose_config(FAST + layout + overrides), Path(run_root) / f"stage{stage}")
    for name, overrides in extra_runs.items():
        run(compose_config(FAST + layout + overrides), Path(run_root) / name)


def _model_state_checks(grid) -> dict:
    """Model-state bytes per rank at every stage (bf16 and fp32), between steps and at the
    step's peak: after backward, gradients complete, before the update frees anything."""
    from nanomt.memory import PeakMemoryMeter
    from nanomt.model import ModelConfig
    from nanomt.model.chunks import build_model_chunks
    from nanomt.optim import build_optimizer
    from run_probes import settled_bytes

    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=16)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(grid.rank))
    out = {}
    for precision in ("bf16", "fp32"):
        for stage in STAGES:
            cfg = compose_config(FAST + [f"parallel.zero_stage={stage}",
                                         f"train.precision={precision}"])
            # Measured: every storage the run allocates from the (meta) model on, alive at
            # the two moments; nothing read from the optimizer's own accounting.
            with PeakMemoryMeter() as meter:
                model, = build_model_chunks(model_cfg, grid, seed=1, device="meta")
                optimizer = build_optimizer([model], cfg, grid, num_microbatches=1,
                                            device="cpu")
                loss = model(tokens, tokens)
                with PeakMemoryMeter() as backward_meter:  # what backward allocates
                    loss.backward()
                gc.collect()  # garbage of earlier loops, freed whenever Python gets to it
                after_backward = settled_bytes(meter)  # gradients complete, activations freed
                optimizer.step()
                gc.collect()
                between_steps = settled_bytes(meter)
            out[(precision, stage)] = {
                "measured": {"between_steps": between_steps, "after_backward": after_backward,
                             "peak_new_in_backward": backward_meter.peak_bytes},
                "between_steps": optimizer.memory(),
                "after_backward": optimizer.memory_after_backward,
                "num_params": model.num_local_parameters(),
                "num_buckets": len(optimizer.buckets),
                "largest_bucket": max(b.padded_numel for b in optimizer.buckets)}
    return out


def _accumulation_checks(grid) -> dict:
    """Three micro-batches at stage 2, both parallel.grad_reduce modes: reductions launched
    after each micro-batch, gradient bytes at the end of backward and at their peak."""
    from comm_counting import count_collectives
    from nanomt.memory import PeakMemoryMeter
    from nanomt.model import GPT, ModelConfig
    from nanomt.optim import build_optimizer

    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=16)
    tokens = torch.randint(0, 256, (3, 2, 16), generator=torch.Generator().manual_seed(grid.rank))
    out = {}
    # stage 0 as the reference: its gradients land in the buffer allocated with the optimizer,
    # so what the meter sees there is the activations and autograd's temporaries alone
    for mode in ("microbatch", "step", "stage0"):
        stage = 0 if mode == "stage0" else 2
        cfg = compose_config(FAST + [f"parallel.zero_stage={stage}",
                                     f"parallel.grad_reduce={'step' if stage == 0 else mode}"])
        model = GPT(model_cfg, grid, seed=1)
        optimizer = build_optimizer([model], cfg, grid, num_microbatches=3)
        launched_after, elements_after = [], []
        # measured: the activations of one micro-batch (equal in both modes) and the gradients
        with count_collectives() as log, PeakMemoryMeter() as meter:
            for i in range(3):
                (model(tokens[i], tokens[i]) / 3).backward()
                scatters = [numel for kind, numel in log if kind == "reduce_scatter"]
                launched_after.append(len(scatters))
                elements_after.append(sum(scatters))
        result = optimizer.step()
        out[mode] = {"after_each_microbatch": launched_after, "skipped": result.skipped,
                     "elements_after_each_microbatch": elements_after,
                     "padded_numel": sum(b.padded_numel for b in optimizer.buckets),
                     "num_buckets": len(optimizer.buckets), "norm": result.grad_norm,
                     "largest_bucket": max(b.padded_numel for b in optimizer.buckets),
                     "num_params": model.num_local_parameters(),
                     "after_backward": optimizer.memory_after_backward,
                     "measured_peak_in_backward": meter.peak_bytes,
                     "grad_left_on_params": any(p.grad is not None for p in model.parameters())}
    return out


def _finish_grad_sync_twice_checks() -> dict:
    """tp=2 with sequence parallelism over the two ranks: a second finalize_grads() (the
    optimizer's step calls it too) must not add the sequence-parallel gradients over tp again."""
    from nanomt.model import GPT, ModelConfig
    from nanomt.parallel.data_parallel import finalize_grads
    from nanomt.parallel.grid import ParallelGrid
    from nanomt.optim import build_optimizer

    grid = ParallelGrid(2, 1, 1)
    model_cfg = ModelConfig(num_layers=1, hidden_size=32, num_heads=4, seq_len=16)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    norms = {}
    for twice in (False, True):
        cfg = compose_config(FAST + ["parallel.zero_stage=1", "parallel.tp=2",
                                     "parallel.sequence_parallel=true"])
        model = GPT(model_cfg, grid, seed=1, sequence_parallel=True)
        optimizer = build_optimizer([model], cfg, grid, num_microbatches=1)
        model(tokens, tokens).backward()
        if twice:
            finalize_grads(optimizer.buffer)
        norms[twice] = optimizer.step().grad_norm
    return norms


def _train_stage3(grid, model, optimizer, tokens) -> tuple[list[float], list[float]]:
    """Steps of two micro-batches each (tokens: [step, micro, batch, seq])."""
    losses, norms = [], []
    for step_tokens in tokens:
        optimizer.zero_grad()
        for micro_tokens in step_tokens:
            loss = model(micro_tokens, micro_tokens) / len(step_tokens)
            loss.backward()
            losses.append(float(loss.detach()))
        norms.append(optimizer.step().grad_norm)
    return losses, norms


def _watch_materialised_layers(model) -> list[int]:
    """Record, as each layer starts its forward and as each gradient lands in backward, how
    many layers hold their parameters (a storage as large as the parameter: ZeRO-3 frees a
    layer by resizing its flat buffer's storage to zero and pointing its parameters at a
    one-element stand-in), read from the tensors, not from the gatherer's counts."""
    counts: list[int] = []

    def sample(*_) -> None:
        counts.append(sum(any(p.untyped_storage().nbytes() >= p.nbytes
                              for p in layer.parameters())
                          for layer in model.layers))

    for layer in model.layers:
        layer.register_forward_pre_hook(sample)  # after ZeRO-3's own: the layer is gathered
        for param in layer.parameters():
            param.register_post_accumulate_grad_hook(sample)
    return counts


def _prefetch_checks(grid) -> dict:
    """ZeRO-3 on 3 layers with parallel.zero3_prefetch 0 and 1, without and with full
    recompute: a step of two micro-batches; a no-grad forward running the layers in reverse
    order (every guess of the next layer wrong); one more step. Losses, norms, final weights and
    the gatherer's counters."""
    from dataclasses import asdict

    from nanomt.model import GPT, ModelConfig
    from nanomt.model.checkpointing import set_activation_checkpointing
    from nanomt.optim import build_optimizer
    from tests.zero3_gather_stats import watch_gathers

    model_cfg = ModelConfig(num_layers=3, hidden_size=32, num_heads=4, seq_len=16)
    tokens = torch.randint(0, 256, (2, 2, 2, 16),
                           generator=torch.Generator().manual_seed(grid.rank))
    out = {}
    for recompute in ("none", "full"):
        for prefetch in (0, 1):
            cfg = compose_config(FAST + ["parallel.zero_stage=3",
                                         f"parallel.zero3_prefetch={prefetch}"])
            model = GPT(model_cfg, grid, seed=1)
            set_activation_checkpointing([model], recompute)
            optimizer = build_optimizer([model], cfg, grid, num_microbatches=2)
            gather_stats = watch_gathers(optimizer.buffer.gatherer)
            materialised = _watch_materialised_layers(model)
            losses, norms = _train_stage3(grid, model, optimizer, tokens[:1])
            in_order = asdict(gather_stats)
            in_order["measured_peak_layers"] = max(materialised)
            with torch.no_grad():
                hidden = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(0))
                for layer in reversed(model.layers):
                    hidden = layer(hidden)
            more_losses, more_norms = _train_stage3(grid, model, optimizer, tokens[1:])
            stats = asdict(gather_stats)
            with optimizer.full_parameters():
                weights = [p.detach().clone() for p in model.parameters()]
            out[(recompute, prefetch)] = {
                "losses": losses + more_losses, "norms": norms + more_norms,
                "weights": weights, "in_order": in_order,
                "all": stats,
                "left_gathered": any(b.gathered for b in optimizer.buckets)}
    return out


def _memory_and_reduction_checks() -> dict:
    from nanomt.parallel.grid import ParallelGrid

    grid = ParallelGrid(1, 1, 2)
    return {"memory": _model_state_checks(grid), "accumulation": _accumulation_checks(grid),
            "sync_twice": _finish_grad_sync_twice_checks(), "prefetch": _prefetch_checks(grid)}


def _dp2_checks(run_root: str) -> dict:
    _train_every_stage(run_root, ["parallel.dp=2"],
                       {"stage3_full_recompute": ["parallel.zero_stage=3",
                                                  "train.activation_checkpointing=full"],
                        "stage2_selective_recompute": ["parallel.zero_stage=2",
                                                       "train.activation_checkpointing=selective"]})
    return _memory_and_reduction_checks()


def _dp4_checks(run_root: str) -> None:
    _train_every_stage(run_root, ["parallel.dp=4", "train.micro_batch_size=1"], {})


def _tp2_pp2_dp2_checks(run_root: str) -> None:
    # ZeRO-3 runs with full activation checkpointing here: recomputation inside the pipeline
    # schedule, with layers gathered and freed around it, must not change the trajectory.
    _train_every_stage(run_root, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2",
                                  "parallel.sequence_parallel=true"], {},
                       per_stage={3: ["train.activation_checkpointing=full"]})


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], list[float]]:
    """The single-process run, built from torch alone: torch.optim.AdamW (foreach=False, decay
    on ndim >= 2) and torch.nn.utils.clip_grad_norm_, on the whole global batch of each step
    (GlobalBatchSampler), with train.py's learning-rate schedule."""
    from nanomt.config import check_config
    from nanomt.model import GPT
    from nanomt.optim.schedule import WarmupCosine
    from nanomt.data.build import build_samplers

    cfg = compose_config(FAST)
    model_cfg, _, _ = check_config(cfg, 1)
    model = GPT(model_cfg, None, seed=cfg.train.seed)
    o = cfg.optim
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2],
               "weight_decay": o.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                              foreach=False)
    lr_at = WarmupCosine(o.lr, o.min_lr, o.warmup_steps, o.decay_steps or cfg.train.steps)
    train_data, _ = build_samplers(cfg, model_cfg.seq_len)
    losses, norms = [], []
    for step in range(STEPS):
        for group in adamw.param_groups:
            group["lr"] = lr_at(step)
        inputs, targets = train_data.global_batch(step)
        adamw.zero_grad(set_to_none=True)
        loss = model(inputs, targets)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)))
        adamw.step()
        losses.append(float(loss.detach()))
    return losses, norms


LAYOUTS = {"dp2": (_dp2_checks, 2), "dp4": (_dp4_checks, 4),
           "tp2_pp2_dp2": (_tp2_pp2_dp2_checks, 8)}


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory) -> dict:
    runs = {}
    for name, (fn, world) in LAYOUTS.items():
        root = tmp_path_factory.mktemp(name)
        results = run_distributed(fn, world_size=world, args=(str(root),), timeout_s=400,
                                  collective_timeout_s=120)
        runs[name] = (root, results)
    return runs


def test_single_process_reference_matches_torch_adamw():
    """The flat-shard AdamW against torch.optim.AdamW (same math; the clipping coefficient may
    differ in the last bit because the norm is summed in another order). Without clipping the
    update is torch's bit for bit: tests/test_optim.py."""
    from nanomt.model import GPT, ModelConfig
    from nanomt.optim import ShardedAdamW
    from nanomt.parallel.data_parallel import GradientBuffer

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_heads=4, seq_len=16)
    torch_model, flat_model = GPT(cfg, None, seed=3), GPT(cfg, None, seed=3)
    groups = [{"params": [p for p in torch_model.parameters() if p.ndim >= 2],
               "weight_decay": 0.1},
              {"params": [p for p in torch_model.parameters() if p.ndim < 2],
               "weight_decay": 0.0}]
    torch_adamw = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                    foreach=False)
    buffer = GradientBuffer([flat_model], None, zero_stage=0, num_microbatches=1,
                            bucket_size_mb=0.01)
    flat_adamw = ShardedAdamW(buffer, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                              grad_clip=1.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens = torch.randint(0, 256, (2, 16), generator=generator)
        torch_adamw.zero_grad()
        torch_model(tokens, tokens).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0))
        torch_adamw.step()
        flat_adamw.zero_grad()
        flat_model(tokens, tokens).backward()
        result = flat_adamw.step()
        assert result.grad_norm == pytest.approx(norm, rel=1e-6)
    for p, q in zip(torch_model.parameters(), flat_model.parameters()):
        # atol: the key bias's gradient is pure rounding noise (softmax ignores a constant
        # added to every key), which Adam normalises into lr-sized steps of random sign.
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("stage", STAGES)
def test_trajectory_matches_single_process_adamw(reference, layout_runs, layout, stage):
    root, _ = layout_runs[layout]
    losses, norms = trajectory(root / f"stage{stage}")
    ref_losses, ref_norms = reference
    assert len(losses) == STEPS and ref_losses[-1] < ref_losses[0] - 0.1  # it learns
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert norms == pytest.approx(ref_norms, rel=1e-5)


@pytest.mark.parametrize("name", ["stage3_full_recompute", "stage2_selective_recompute"])
def test_zero_with_activation_checkpointing_matches(reference, layout_runs, name):
    root, _ = layout_runs["dp2"]
    losses, norms = trajectory(root / name)
    assert losses == pytest.approx(reference[0], rel=1e-5)
    assert norms == pytest.approx(reference[1], rel=1e-5)


# Bytes per parameter: (param, grad, optimizer state). Mixed precision: bf16 params, fp32
# gradients (train.fp32_grads), fp32 masters + 2 moments = 2 + 4 + 12; fp32 Adam: the parameters
# are the master weights, so 4 + 4 + 8.
BYTES = {"bf16": (2, 4, 12), "fp32": (4, 4, 8)}
KINDS = ("params", "grads", "optimizer_state")


@pytest.mark.parametrize("precision", list(BYTES))
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("when", ["after_backward", "between_steps"])
def test_bytes_per_rank_follow_zero_formulas(layout_runs, precision, stage, when):
    """After backward (the peak: every gradient reduced, nothing freed yet) and between steps."""
    from nanomt.memory import zero_formula_bytes

    dp = 2
    for rank_result in layout_runs["dp2"][1]:
        result = rank_result["memory"][(precision, stage)]
        expected = zero_formula_bytes(result["num_params"], dp, stage, *BYTES[precision])
        # Each bucket pads to a multiple of dp: at most dp - 1 extra elements per bucket.
        padding = result["num_buckets"] * (dp - 1) * sum(BYTES[precision])
        # measured allocations (PeakMemoryMeter) against the formula's total; a few KiB of
        # scalars (the loss, the norm) besides
        measured = result["measured"][when]
        assert sum(expected.values()) <= measured <= sum(expected.values()) + padding + 4096, \
            (measured, expected)
        # what the buffer and the optimizer report, kind by kind, agrees with the formulas...
        reported = result[when]
        for what, per_elem in zip(KINDS, BYTES[precision]):
            slack = result["num_buckets"] * (dp - 1) * per_elem
            assert expected[what] <= reported[what] <= expected[what] + slack, (what, reported)
        # ...and with what was measured
        assert sum(reported[k] for k in KINDS) <= measured <= sum(reported[k] for k in KINDS) + 4096
        if precision == "bf16":  # ZeRO's savings, on every rank
            assert measured / (18 * result["num_params"]) == pytest.approx(
                {0: 1.0, 1: (6 + 12 / dp) / 18, 2: (2 + 16 / dp) / 18, 3: 1 / dp}[stage],
                rel=0.02)


def test_gradients_during_backward_stay_below_the_full_model(layout_runs):
    """ZeRO-2/3 never hold the whole model's gradients beside the shards: during backward, full
    buffers exist for the bucket being filled and the one being reduce-scattered (with its
    reduced shard); keeping every bucket until step() would reach shards + 4 Psi.

    Measured (PeakMemoryMeter around backward alone: the peak of the storages it creates). At
    stage 0 the gradients land in place in the buffer allocated with the optimizer, so its
    backward allocates only autograd's temporaries; same model, same tokens at stages 2-3: the
    difference is what their gradient buckets hold at the peak, at most two full buckets and a
    reduced shard (the shards themselves exist from the optimizer's build on)."""
    dp = 2
    for rank_result in layout_runs["dp2"][1]:
        temporaries = rank_result["memory"][("fp32", 0)]["measured"]["peak_new_in_backward"]
        for stage in (2, 3):
            result = rank_result["memory"][("fp32", stage)]
            buckets = result["measured"]["peak_new_in_backward"] - temporaries
            largest = 4 * result["largest_bucket"]
            assert buckets <= 2 * largest + largest / dp, (stage, buckets, largest)
            assert buckets < 4 * result["num_params"], (stage, buckets)


def test_accumulation_modes(layout_runs):
    """grad_reduce=microbatch: a reduce-scatter per bucket per micro-batch, only the shard left
    after backward. grad_reduce=step: once, after the last micro-batch, full buffers during
    accumulation. Both give the same gradient."""
    dp = 2
    for rank_result in layout_runs["dp2"][1]:
        per_micro, per_step = (rank_result["accumulation"][mode]
                               for mode in ("microbatch", "step"))
        buckets = per_step["num_buckets"]
        assert buckets > 1
        assert per_step["after_each_microbatch"] == [0, 0, buckets]
        assert per_micro["after_each_microbatch"] == [buckets, 2 * buckets, 3 * buckets]
        # gradient traffic: every bucket's padded elements once per reduction round
        padded = per_micro["padded_numel"]
        assert per_step["elements_after_each_microbatch"] == [0, 0, padded]
        assert per_micro["elements_after_each_microbatch"] == [padded, 2 * padded, 3 * padded]
        for r in (per_micro, per_step):
            assert not r["skipped"] and not r["grad_left_on_params"]
            slack = buckets * (dp - 1) * 4
            assert r["after_backward"]["grads"] <= 4 * r["num_params"] / dp + slack
        assert per_micro["norm"] == pytest.approx(per_step["norm"], rel=1e-5)
        # Measured (the meter around the three micro-batches; equal activations in every run):
        # beyond stage 0's peak, "step" keeps every full buffer through the accumulation,
        # "microbatch" at most two full buckets and a reduced shard.
        reference = rank_result["accumulation"]["stage0"]["measured_peak_in_backward"]
        step_extra = per_step["measured_peak_in_backward"] - reference
        micro_extra = per_micro["measured_peak_in_backward"] - reference
        largest = 4 * per_micro["largest_bucket"]
        assert step_extra >= 4 * per_step["num_params"], (step_extra, per_step["num_params"])
        assert micro_extra <= 2 * largest + largest / dp, (micro_extra, largest)
        # ... and the buffer's own count of its gradient bytes agrees with the measurement
        step_peak = per_step["after_backward"]["grads_peak_in_backward"]
        micro_peak = per_micro["after_backward"]["grads_peak_in_backward"]
        measured_gap = step_extra - micro_extra
        assert step_peak - micro_peak <= measured_gap <= step_peak - micro_peak + largest, \
            (measured_gap, step_peak - micro_peak, largest)


def test_finalize_grads_twice_is_a_no_op(layout_runs):
    for rank_result in layout_runs["dp2"][1]:
        norms = rank_result["sync_twice"]
        assert norms[True] == norms[False]


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_stage3_prefetch_changes_nothing_but_the_timing(layout_runs, recompute):
    """parallel.zero3_prefetch=1 against 0 (synchronous gathers): identical losses, norms and
    weights, with and without recompute, also after a forward that defeats every guess."""
    for rank_result in layout_runs["dp2"][1]:
        runs = rank_result["prefetch"]
        off, on = runs[(recompute, 0)], runs[(recompute, 1)]
        assert on["losses"] == off["losses"] and on["norms"] == off["norms"]
        for p_on, p_off in zip(on["weights"], off["weights"]):
            assert torch.equal(p_on, p_off)
        assert not on["left_gathered"] and not off["left_gathered"]


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_stage3_prefetch_gathers_ahead_within_bounded_memory(layout_runs, recompute):
    """3 layers, 2 micro-batches in order: per forward the chunk prefetches layer 0, layer 0
    layer 1, layer 1 layer 2; backward the same in reverse: 6 gathers launched ahead per
    micro-batch, all claimed by their layer; as many all-gathers as without prefetch. At most
    1 + prefetch layers materialised at once. Layers run in reverse order: the wrong guesses
    are freed unused, and the step after still matches (previous test)."""
    for rank_result in layout_runs["dp2"][1]:
        runs = rank_result["prefetch"]
        off, on = runs[(recompute, 0)], runs[(recompute, 1)]
        assert on["in_order"]["prefetches"] == on["in_order"]["prefetch_hits"] == 2 * 6
        assert on["in_order"]["prefetch_misses"] == 0
        assert on["in_order"]["gathers"] == off["in_order"]["gathers"] > 0
        assert off["all"]["prefetches"] == 0
        assert off["all"]["peak_layers"] == 1 and on["all"]["peak_layers"] == 2
        # measured on the tensors: the running layer, plus the prefetched one when on
        assert off["in_order"]["measured_peak_layers"] == 1
        assert on["in_order"]["measured_peak_layers"] == 2
        assert on["all"]["prefetch_misses"] >= 1
        assert on["all"]["prefetches"] == on["all"]["prefetch_hits"] + on["all"]["prefetch_misses"]
