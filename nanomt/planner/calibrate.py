"""Measuring this machine for the step-time model (tools/plan.py --calibrate).

Every rank of `world` spawned processes (gloo, CPU tensors) measures at once, so
what one rank gets is what it gets in training, beside its peers:

    peak_tflops          the model's GEMMs at its shapes (b s tokens x h x 3h, h x h, h x f,
                         f x h), FLOPs 2 M K N over the time
    compute_efficiency   one forward + backward of the whole model (nanomt.model.GPT) at the
                         paper's FLOP count (nanomt.flops) over that time, as a fraction of the
                         GEMMs' rate: what the norms, softmax and elementwise ops cost
    intra/inter_node_gbps  the median bus bandwidth of all-reduce (2 (n-1)/n B / t),
                         all-gather and reduce-scatter ((n-1)/n B / t) of 4 MiB; every rank
                         sits on this one host, so both links are the one measured
    latency_us           what one all-reduce of one micro-batch's hidden states adds to a
                         stream of the model's GEMMs, less its bandwidth time, per ring step
                         (an all-reduce over n ranks takes 2 (n-1) of them): in training a
                         collective waits for the slowest rank of its group, so on a host
                         with more ranks than cores it costs a scheduling turn, not the
                         microseconds of an idle ping (recorded too, as ping_us)
    bubble_cost          1 when every rank has a core of its own; 0 when ranks outnumber the
                         cores: a rank idle in the pipeline's bubble hands its core to the
                         others, so the bubble costs no time (on a GPU, 1: the device idles)
    memory_gbps          a copy of 64 MiB: 2 B / t

The machine file holds these (what step_time.Machine reads) and every measurement under
"measured".
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

from nanomt.flops import flops_per_iteration
from nanomt.model.config import ModelConfig

MIB = 2**20


def best_seconds(fn, repeats: int = 5) -> float:
    """The shortest of `repeats` timed calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_tflops(cfg: ModelConfig, micro_batch: int, dtype: torch.dtype) -> float:
    """TFLOP/s of the model's four GEMMs at its shapes (tp = 1)."""
    m, h, f = micro_batch * cfg.seq_len, cfg.hidden_size, cfg.ffn_hidden_size
    shapes = [(m, h, 3 * h), (m, h, h), (m, h, f), (m, f, h)]
    pairs = [(torch.randn(a, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for a, k, n in shapes]
    seconds = best_seconds(lambda: [a @ b for a, b in pairs])
    return sum(2 * a * k * n for a, k, n in shapes) / seconds / 1e12


def model_tflops(cfg: ModelConfig, micro_batch: int, dtype: torch.dtype) -> float:
    """TFLOP/s of one forward + backward of the whole model, at the paper's FLOP count."""
    from nanomt.model.gpt import GPT

    model = GPT(cfg, None).to(dtype)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len))

    def step() -> None:
        model(tokens, tokens).backward()
        model.zero_grad(set_to_none=True)

    return flops_per_iteration(cfg, micro_batch) / best_seconds(step, repeats=6) / 1e12


def collective_gbps(nbytes: int, world: int) -> dict[str, float]:
    """Bus bandwidths (GB/s) of all-reduce, all-gather, reduce-scatter and p2p of `nbytes`."""
    n, whole = world, torch.zeros(nbytes // 4)
    piece = torch.zeros(nbytes // 4 // n)
    pieces = [torch.zeros_like(piece) for _ in range(n)]
    rank = dist.get_rank()
    partner = rank ^ 1 if (rank ^ 1) < n else rank

    def p2p() -> None:
        if partner == rank:
            return
        if rank % 2 == 0:
            dist.send(whole, partner)
        else:
            dist.recv(whole, partner)

    timed = {"all_reduce": (lambda: dist.all_reduce(whole), 2 * (n - 1) / n),
             "all_gather": (lambda: dist.all_gather(pieces, piece), (n - 1) / n),
             "reduce_scatter": (lambda: dist.reduce_scatter(piece, pieces), (n - 1) / n),
             "p2p": (p2p, 1.0)}
    out = {}
    for name, (fn, factor) in timed.items():
        dist.barrier()
        out[name] = factor * nbytes / best_seconds(fn) / 1e9
    return out


def collective_in_compute_us(cfg: ModelConfig, micro_batch: int, dtype: torch.dtype,
                             all_reduce_gbps: float, rounds: int = 20) -> float:
    """Microseconds one all-reduce of [b s, h] adds to a stream of [b s, h] x [h, h] GEMMs,
    beyond its bytes at the measured bandwidth (module docstring)."""
    m, h = micro_batch * cfg.seq_len, cfg.hidden_size
    x, w = torch.randn(m, h, dtype=dtype), torch.randn(h, h, dtype=dtype)
    hidden = torch.zeros(m, h, dtype=dtype)
    n = dist.get_world_size()

    def gemms(with_collective: bool) -> None:
        for _ in range(rounds):
            x @ w
            if with_collective:
                dist.all_reduce(hidden)

    dist.barrier()
    alone = best_seconds(lambda: gemms(False), repeats=3)
    dist.barrier()
    paired = best_seconds(lambda: gemms(True), repeats=3)
    wire = 2 * (n - 1) / n * hidden.numel() * hidden.element_size() / (all_reduce_gbps * 1e9)
    return max((paired - alone) / rounds - wire, 0.0) * 1e6


def measure_rank(cfg: ModelConfig, micro_batch: int, dtype_name: str) -> dict[str, float]:
    """Every measurement of one rank (all ranks run this at once: run_distributed)."""
    dtype = getattr(torch, dtype_name)
    world = dist.get_world_size()
    dist.barrier()
    out = {"matmul_tflops": matmul_tflops(cfg, micro_batch, dtype)}
    dist.barrier()
    out["model_tflops"] = model_tflops(cfg, micro_batch, dtype)
    out.update({f"{k}_gbps": v for k, v in collective_gbps(4 * MIB, world).items()})
    one = torch.zeros(1)
    dist.barrier()
    out["ping_us"] = best_seconds(lambda: dist.all_reduce(one), repeats=20) * 1e6
    in_compute = collective_in_compute_us(cfg, micro_batch, dtype, out["all_reduce_gbps"])
    out["latency_us"] = in_compute / (2 * (world - 1))  # an all-reduce is 2 (n-1) ring steps
    big, other = torch.zeros(16 * MIB), torch.ones(16 * MIB)
    dist.barrier()
    out["memory_gbps"] = 2 * big.numel() * 4 / best_seconds(lambda: big.copy_(other)) / 1e9
    return out


def machine_file(per_rank: list[dict[str, float]], world: int) -> dict:
    """The machine file: the median over ranks of each measurement, as step_time.Machine's
    keys (module docstring), with the measurements themselves under "measured"."""
    median = {k: statistics.median(r[k] for r in per_rank) for k in per_rank[0]}
    link = statistics.median(median[f"{k}_gbps"] for k in ("all_reduce", "all_gather",
                                                            "reduce_scatter"))
    return {"gpus_per_node": world, "peak_tflops": median["matmul_tflops"],
            "compute_efficiency": median["model_tflops"] / median["matmul_tflops"],
            "intra_node_gbps": link, "inter_node_gbps": link,
            "latency_us": median["latency_us"], "memory_gbps": median["memory_gbps"],
            "bubble_cost": 1.0 if world <= len(os.sched_getaffinity(0)) else 0.0,
            "measured": median}
