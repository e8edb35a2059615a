"""Choosing a layout: every layout of the cluster, those that fit, ranked by the step-time model.

For a model, a global batch G and N GPUs of M bytes, `search` walks every

    tp | GPUs per node (and tp | heads, hidden, ffn, expert ffn), pp | layers, cp in 1, 2, 4, 8
    (2 cp | s),
    dp = N / (tp cp pp), micro-batch b in 1, 2, 4, 8 with b dp | G,
    schedule 1F1B (v | l/pp chunks per rank, v > 1 when pp | m), GPipe, ZB-H1 (v = 1) or
    ZB-V (v = 2, untied embeddings),
    ZeRO stage 0-3 (when dp cp > 1), sequence parallelism (when tp > 1),
    recompute none / selective / full,
    expert parallelism ep | dp cp with ep | E (a mixture-of-experts model only)

that the training config accepts (nanomt.config's rules), plans each (estimate.py), drops
those over M, each counted under its largest term (weights, grads, optimizer, activations,
ZeRO-3's gathered layers), and sorts the rest by the step time (step_time.py). What sets two
neighbours in the ranking apart is the terms whose difference adds up to most of the gap.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterator

from nanomt.model.config import ModelConfig
from nanomt.planner.estimate import GIB, Plan, PlanInputs, make_plan
from nanomt.planner.step_time import Machine, StepTime, step_time

MICRO_BATCHES = (1, 2, 4, 8)
CONTEXT_PARALLEL = (1, 2, 4, 8)
RECOMPUTE = ("none", "selective", "full")


@dataclass
class Candidate:
    plan: Plan
    time: StepTime


@dataclass
class SearchResult:
    ranked: list[Candidate]                          # every layout that fits, fastest first
    dropped: Counter = field(default_factory=Counter)  # largest memory term -> layouts over M
    considered: int = 0

    def rank_of(self, x: PlanInputs) -> int | None:
        """1-based place of layout `x` among the feasible ones (None: not among them)."""
        for place, candidate in enumerate(self.ranked, 1):
            if same_layout(candidate.plan.inputs, x):
                return place
        return None


LAYOUT_KEYS = ("tp", "pp", "dp", "cp", "ep", "virtual_stages", "schedule", "zero_stage",
               "micro_batch", "sequence_parallel", "recompute")


def same_layout(a: PlanInputs, b: PlanInputs) -> bool:
    """Same knobs the search turns (the machine and precision aside)."""
    return all(getattr(a, key) == getattr(b, key) for key in LAYOUT_KEYS)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def grids(cfg: ModelConfig, gpus: int, gpus_per_node: int) -> Iterator[tuple[int, int, int, int]]:
    """(tp, cp, pp, dp) covering `gpus`, tp inside a node."""
    for tp in divisors(gpus_per_node):
        if cfg.num_heads % tp or cfg.hidden_size % tp or cfg.ffn_hidden_size % tp:
            continue
        if cfg.moe is not None and cfg.moe.ffn_hidden_size % tp:  # tp splits every expert
            continue
        for cp in CONTEXT_PARALLEL:
            if cfg.seq_len % (2 * cp) and cp > 1:
                continue
            for pp in divisors(cfg.num_layers):
                if gpus % (tp * cp * pp) == 0:
                    yield tp, cp, pp, gpus // (tp * cp * pp)


def expert_parallel_sizes(cfg: ModelConfig, dp: int, cp: int) -> list[int]:
    """ep: the divisors of dp cp that divide the experts (1 alone for a dense model)."""
    if cfg.moe is None:
        return [1]
    return [ep for ep in divisors(dp * cp) if cfg.moe.num_experts % ep == 0]


def schedules(cfg: ModelConfig, pp: int, m: int) -> Iterator[tuple[str, int]]:
    """(schedule, virtual stages) the config accepts for pp stages and m micro-batches."""
    if pp == 1:
        yield "1f1b", 1
        return
    yield "gpipe", 1
    for v in divisors(cfg.num_layers // pp):
        if v == 1 or m % pp == 0:
            yield "1f1b", v
    yield "zb_h1", 1
    if cfg.num_layers % (2 * pp) == 0 and not cfg.tie_embeddings:
        yield "zbv", 2


def layouts(cfg: ModelConfig, base: PlanInputs, gpus: int,
            gpus_per_node: int) -> Iterator[PlanInputs]:
    """Every layout of `gpus` GPUs for `base`'s global batch and precision (module docstring)."""
    G = base.global_batch
    for tp, cp, pp, dp in grids(cfg, gpus, gpus_per_node):
        for b in MICRO_BATCHES:
            if G % (b * dp):
                continue
            for schedule, v in schedules(cfg, pp, G // (b * dp)):
                stages = range(4) if dp * cp > 1 else (0,)
                sp_choices = (False, True) if tp > 1 and (cfg.seq_len // cp) % tp == 0 else (
                    False,)
                for zero, sp, recompute, ep in itertools.product(
                        stages, sp_choices, RECOMPUTE, expert_parallel_sizes(cfg, dp, cp)):
                    yield replace(base, tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, micro_batch=b,
                                  schedule=schedule, virtual_stages=v, zero_stage=zero,
                                  sequence_parallel=sp, recompute=recompute)


def largest_term(plan: Plan) -> str:
    return max(plan.bytes_per_gpu, key=plan.bytes_per_gpu.get)


def search(cfg: ModelConfig, base: PlanInputs, gpus: int, machine: Machine) -> SearchResult:
    """Every layout of `gpus` GPUs that fits base.gpu_memory_gb, fastest first."""
    result = SearchResult(ranked=[])
    for x in layouts(cfg, base, gpus, machine.gpus_per_node):
        result.considered += 1
        plan = make_plan(cfg, x)
        if plan.total_bytes > x.gpu_memory_gb * GIB:
            result.dropped[largest_term(plan)] += 1
            continue
        result.ranked.append(Candidate(plan, step_time(
            cfg, x, plan.params_per_rank, plan.hardware_flops_per_iteration,
            plan.model_flops_per_iteration, machine, plan.expert_params_per_rank)))
    result.ranked.sort(key=lambda c: (c.time.total, c.plan.total_bytes))  # ties: more room
    return result


def why_faster(fast: Candidate, slow: Candidate) -> str:
    """The gap between two step times and the terms that make most of it (on a tie: the
    memory the first leaves free)."""
    a, b = fast.time, slow.time
    gap = b.total - a.total
    if gap <= 1e-9 * b.total:
        room = (slow.plan.total_bytes - fast.plan.total_bytes) / GIB
        return f"as fast, {room:.1f} GiB less memory per GPU"
    diffs = sorted(((b.terms[k] - a.terms[k], k) for k in a.terms), key=lambda d: -abs(d[0]))
    parts = [f"{k} {a.terms[k]:.3g} vs {b.terms[k]:.3g} s" for d, k in diffs[:3]
             if abs(d) > 0.05 * gap]
    return f"{gap:.3g} s ({100 * gap / b.total:.1f}%) faster: " + ", ".join(parts)
