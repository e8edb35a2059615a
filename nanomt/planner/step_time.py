"""The step-time model: one optimizer step of a layout, as a sum of terms a reader can check.

A pipeline rank is busy for the compute of its layers plus the communication that the code
runs in line with it; the schedule's bubble stretches that busy time by its bubble fraction; the
data-parallel traffic adds what the code does not hide behind compute; the optimizer's update
ends the step. With N GPUs, R the achievable FLOP/s of one GPU, m micro-batches of b
sequences, s' = s / cp tokens each, e bytes per activation element, t = tp, L = l / p layers
per rank (v chunks of l/(p v)), and a collective over n ranks of B bytes at bus bandwidth W
(nccl-tests' convention) in ring steps of fixed cost a each (Thakur et al. 2005's alpha-beta
model; plan.latency_us):

    all-reduce  2 (n-1)/n B / W + 2 (n-1) a      reduce-scatter, all-gather  (n-1)/n B / W + (n-1) a
    p2p         B / W + a

    compute      model FLOPs / (N R)                   (Korthikanti et al.: 72 B s l h^2 (..))
    recompute    (hardware - model FLOPs) / (N R)      the extra forward (full: the layers'
                                                       whole forward; selective: attention)
    tp           m L (4 [+2 full recompute]) all-reduce(e b s' h) over t ranks: the f and g
                 operators' two all-reduces forward and two backward per layer (under sequence
                 parallelism an all-gather + reduce-scatter of the same bytes, same time)
    cp           m L cp p2p(2 e b s' h / t): the backward's dK and dV hops, which wait for
                 the blocks that add to them; the K, V hops travel while a block computes
                 (nanomt.parallel.context_parallel), so only their latency counts
    pp           2 m v p2p(e b s' h / t) sends and receives between stages (the wire carries
                 1/t of the activation) + as many all-gathers over tp to rebuild it
    ep           m L_moe (4 [+2 full recompute]) all-to-all(e b s' top_k h) over ep ranks: per
                 mixture-of-experts layer the routed token rows go to their experts' ranks and
                 come back, in forward and in backward (docs/moe.md); an all-to-all of B bytes
                 per rank takes (n-1)/n B / W + (n-1) a (pairwise exchange)
    bubble       bubble fraction (schedule_costs.py: (p-1)/(v m) for 1F1B, (p-1)/(3m) ZB-H1)
                 x (compute + recompute + tp + cp + pp + ep) x plan.bubble_cost
                 (1 on GPUs; calibrate.py measures it for a CPU host)
    dp           stage 0: all-reduce(g Psi); 1-2: reduce-scatter(g Psi) + all-gather(e Psi)
                 over dp cp ranks, Psi this rank's parameters. The reduce runs during the last
                 micro-batch's backward (buckets): hidden up to that backward's time, but never
                 its last bucket. The all-gather of the updated parameters waits at the end of
                 the step unless parallel.overlap_param_gather hides it behind the first
                 forward; each bucket of parallel.bucket_size_mb pays its own steps' a. Stage 3
                 gathers e Psi around every forward and backward of every micro-batch, one
                 collective per layer, prefetched one layer ahead: what a pass's compute cannot
                 hide (and the first layer's gather) is exposed, and every gather's fixed
                 cost, 2 m times. A mixture of experts' stacked experts, Psi_E of Psi, are
                 reduced (and sharded) over the dp cp / ep ranks of their ep rank, the rest
                 over dp cp: each group pays its own collectives.
    optimizer    AdamW reads and writes its shard's weights, gradients and state once:
                 2 (e + g + K) Psi / (N_d at ZeRO >= 1) / memory bandwidth (Psi_E / (N_d/ep))

The link of a dimension: its group spans stride x size consecutive ranks of the grid
(tp innermost, then cp, dp, pp: nanomt.parallel.grid); within plan.gpus_per_node that is the
intra-node link (NVLink), else the inter-node one (InfiniBand, per GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanomt.model.config import ModelConfig
from nanomt.planner.estimate import STATE_BYTES, PlanInputs, moe_layers_on_pipeline_rank
from nanomt.planner.schedule_costs import bubble_fraction, pass_times

TERMS = ("compute", "recompute", "tp", "cp", "pp", "ep", "bubble", "dp", "optimizer")


@dataclass(frozen=True)
class Machine:
    """A cluster as the plan.* keys (or a --calibrate machine file) describe it."""

    gpus_per_node: int = 8
    peak_tflops: float = 312.0          # dense bf16 peak of one GPU (A100: 312)
    compute_efficiency: float = 0.6     # fraction of the peak a layer's FLOPs run at
    intra_node_gbps: float = 200.0      # bus bandwidth inside a node, GB/s per GPU (NVLink)
    inter_node_gbps: float = 20.0       # between nodes, GB/s per GPU (one HDR NIC each)
    latency_us: float = 3.0             # fixed cost of one ring step or message
    memory_gbps: float = 1500.0         # GPU memory bandwidth, for the optimizer's update
    bubble_cost: float = 1.0            # fraction of the bubble that is lost time (calibrate.py)

    @property
    def flops_per_s(self) -> float:
        return self.peak_tflops * self.compute_efficiency * 1e12


@dataclass
class StepTime:
    """Seconds per step, term by term (TERMS); `total` is their sum."""

    terms: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def link_gbps(machine: Machine, stride: int, size: int) -> float:
    """Bus bandwidth of a group of `size` ranks `stride` apart (module docstring)."""
    inside = stride * size <= machine.gpus_per_node
    return machine.intra_node_gbps if inside else machine.inter_node_gbps


def all_reduce_s(nbytes: float, n: int, gbps: float, machine: Machine) -> float:
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (gbps * 1e9) + 2 * (n - 1) * machine.latency_us * 1e-6


def gather_s(nbytes: float, n: int, gbps: float, machine: Machine) -> float:
    """An all-gather or a reduce-scatter of a `nbytes` whole over `n` ranks."""
    if n == 1:
        return 0.0
    return (n - 1) / n * nbytes / (gbps * 1e9) + (n - 1) * machine.latency_us * 1e-6


def all_to_all_s(nbytes: float, n: int, gbps: float, machine: Machine) -> float:
    """An all-to-all of `nbytes` per rank over `n` ranks: (n-1)/n of them leave, n-1 steps."""
    if n == 1:
        return 0.0
    return (n - 1) / n * nbytes / (gbps * 1e9) + (n - 1) * machine.latency_us * 1e-6


def p2p_s(nbytes: float, gbps: float, machine: Machine) -> float:
    return nbytes / (gbps * 1e9) + machine.latency_us * 1e-6


def activation_bytes(cfg: ModelConfig, x: PlanInputs) -> float:
    """e b s' h: one micro-batch's hidden states on one rank, before any tp split."""
    e = 4 if x.precision == "fp32" else 2
    return e * x.micro_batch * (cfg.seq_len // x.cp) * cfg.hidden_size


def compute_s(model_flops: float, x: PlanInputs, machine: Machine) -> float:
    return model_flops / (x.num_gpus * machine.flops_per_s)


def recompute_s(hardware_flops: float, model_flops: float, x: PlanInputs,
                machine: Machine) -> float:
    return (hardware_flops - model_flops) / (x.num_gpus * machine.flops_per_s)


def tp_s(cfg: ModelConfig, x: PlanInputs, machine: Machine) -> float:
    passes = 4 + (2 if x.recompute == "full" else 0)
    one = all_reduce_s(activation_bytes(cfg, x), x.tp, link_gbps(machine, 1, x.tp), machine)
    return x.num_microbatches * cfg.num_layers // x.pp * passes * one


def cp_s(cfg: ModelConfig, x: PlanInputs, machine: Machine) -> float:
    if x.cp == 1:
        return 0.0
    gbps = link_gbps(machine, x.tp, x.cp)
    grads_home = x.cp * p2p_s(2 * activation_bytes(cfg, x) / x.tp, gbps, machine)
    forwards = 2 if x.recompute == "full" else 1
    kv_latency = (forwards + 1) * (x.cp - 1) * machine.latency_us * 1e-6
    return x.num_microbatches * cfg.num_layers // x.pp * (grads_home + kv_latency)


def pp_s(cfg: ModelConfig, x: PlanInputs, machine: Machine) -> float:
    if x.pp == 1:
        return 0.0
    stride = x.tp * x.cp * x.dp
    piece = activation_bytes(cfg, x) / x.tp
    one = p2p_s(piece, link_gbps(machine, stride, 2), machine)
    if not x.sequence_parallel:
        one += gather_s(activation_bytes(cfg, x), x.tp, link_gbps(machine, 1, x.tp), machine)
    return 2 * x.num_microbatches * x.virtual_stages * one


def ep_s(cfg: ModelConfig, x: PlanInputs, machine: Machine) -> float:
    if x.ep == 1 or not cfg.moe:
        return 0.0
    passes = 4 + (2 if x.recompute == "full" else 0)
    routed = activation_bytes(cfg, x) * cfg.moe.top_k
    one = all_to_all_s(routed, x.ep, link_gbps(machine, x.tp, x.ep), machine)
    layers = max(moe_layers_on_pipeline_rank(cfg, x, r) for r in range(x.pp))
    return x.num_microbatches * layers * passes * one


def bubble_s(busy_s: float, x: PlanInputs, machine: Machine) -> float:
    fraction = bubble_fraction(x.schedule, x.pp, x.num_microbatches, x.virtual_stages,
                               pass_times(x.recompute))
    return machine.bubble_cost * fraction * busy_s


def dp_s(x: PlanInputs, psi: int, pass_s: tuple[float, float], units: int,
         machine: Machine, psi_experts: int = 0) -> float:
    """Exposed data-parallel time; pass_s = (one micro-batch's forward, its backward) on this
    rank, the compute that hides the traffic; `units` ZeRO-3 gathers per pass (the layers);
    `psi_experts` of the `psi` parameters are stacked experts (over dp cp / ep ranks)."""
    groups = [(n_params, ranks) for n_params, ranks in
              ((psi - psi_experts, x.dp * x.cp), (psi_experts, x.expert_dp))
              if n_params and ranks > 1]
    if not groups:
        return 0.0
    gbps = link_gbps(machine, x.tp, x.dp * x.cp)
    e = 4 if x.precision == "fp32" else 2
    g = 4 if x.precision == "fp32" or x.fp32_grads else 2
    forward, backward = pass_s
    collective = all_reduce_s if x.zero_stage == 0 else gather_s
    reduce = 0.0
    for n_params, n in groups:
        bucket = min(g * n_params, x.bucket_mb * 2**20)
        reduce += collective(g * n_params, n, gbps, machine)
        reduce += (math.ceil(g * n_params / bucket) - 1) * collective(0, n, gbps, machine)
    n_params, n = groups[0]
    last_bucket = collective(min(g * n_params, x.bucket_mb * 2**20), n, gbps, machine)
    exposed = max(reduce - backward, last_bucket)
    gather = sum(gather_s(e * n_params, n, gbps, machine) for n_params, n in groups)
    if x.zero_stage in (1, 2):
        exposed += max(gather - forward, 0.0) if x.overlap_param_gather else gather
    elif x.zero_stage == 3:
        fixed = sum(gather_s(0, n, gbps, machine) for _, n in groups)
        wire = gather - fixed
        per_pass = [units * fixed + (max(wire - compute, wire / units) if x.zero3_prefetch
                                     else wire) for compute in (forward, backward)]
        exposed += x.num_microbatches * sum(per_pass)
    return exposed


def optimizer_s(x: PlanInputs, psi: int, machine: Machine, psi_experts: int = 0) -> float:
    e = 4 if x.precision == "fp32" else 2
    g = 4 if x.precision == "fp32" or x.fp32_grads else 2
    shard = psi
    if x.zero_stage >= 1:
        shard = (psi - psi_experts) / (x.dp * x.cp) + psi_experts / x.expert_dp
    return 2 * (e + g + STATE_BYTES[x.precision]) * shard / (machine.memory_gbps * 1e9)


def step_time(cfg: ModelConfig, x: PlanInputs, psi: int, hardware_flops: float,
              model_flops: float, machine: Machine, psi_experts: int = 0) -> StepTime:
    """Every term of one step of layout `x` (psi: the largest rank's parameters, psi_experts
    of them its stacked experts')."""
    t = {"compute": compute_s(model_flops, x, machine),
         "recompute": recompute_s(hardware_flops, model_flops, x, machine),
         "tp": tp_s(cfg, x, machine), "cp": cp_s(cfg, x, machine), "pp": pp_s(cfg, x, machine),
         "ep": ep_s(cfg, x, machine)}
    busy = sum(t.values())
    t["bubble"] = bubble_s(busy, x, machine)
    # one micro-batch's passes: the forward a third of the model FLOPs, the backward the rest
    # and the recompute; the communication in line with them splits the same way
    m = x.num_microbatches
    forward = (t["compute"] / 3 + (t["tp"] + t["cp"] + t["ep"]) / 3) / m
    backward = busy / m - forward
    layers = cfg.num_layers // x.pp
    t["dp"] = dp_s(x, psi, (forward, backward), layers, machine, psi_experts)
    t["optimizer"] = optimizer_s(x, psi, machine, psi_experts)
    return StepTime(t)
