"""The plan of one layout: parameters, bytes per GPU, pipeline bubble, FLOPs and step time.

For a model on tp x cp x pp (x v virtual stages) x dp GPUs, with global batch G of
micro-batches b (context parallelism: a rank holds s/cp tokens of every sequence, so below s
stands for s/cp; the dp x cp ranks of a (tp, pp) position hold the same weights):

    micro-batches per step   m = G / (b dp)
    bubble                   (p - 1) / (v m)          (Narayanan et al. 2021, section 2.2),
                             (p - 1) / (3m) under ZB-H1, 0 under ZB-V (schedule_costs.py:
                             with F = B = W; full recompute makes B twice as long)
    model state per GPU      ZeRO's formulas on the largest rank's Psi parameters, sharded
                             over dp x cp (nanomt.memory.zero_formula_bytes); of them the
                             stacked experts' (a mixture of experts), E/ep per layer, over
                             the dp cp / ep ranks of the same expert-parallel rank
    activations per GPU      the most bytes in flight on any pipeline rank: walk its schedule
                             (nanomt.parallel.pipeline.schedules), adding a chunk's bytes at each
                             forward and removing them at its backward (the first rank's
                             warm-up is the longest and the last rank holds the head: the
                             peak is on one of the two, so only they are walked). A chunk keeps per
                             micro-batch l/(p v) layers x Korthikanti et al.'s per-layer bytes
                             (nanomt.memory.activation_bytes_per_layer; the embedding's output
                             is the first layer's input, counted there), plus, on the last, the
                             final norm's and the head's inputs (2 e s b h) and the one fp32
                             buffer the cross-entropy keeps (4 s b V_padded / t: the log-softmax,
                             or the vocab-parallel loss's softmax); the e s b h terms / t under
                             sequence parallelism. At the backward's peak the gradients flowing
                             through one MLP (2 e s b f / t) and, with pp > 1, the pipeline's
                             receive buffers (the backward's gradient, e s b h, and the other
                             input of an interleaved pair, e s b h / t) live beside them; on
                             the last rank, so does one more logits buffer (the loss's working
                             copy or its gradient, for the one micro-batch at the loss).
                             Zero-bubble schedules (zb_h1, zbv): B frees a micro-batch's
                             kept bytes, but its linears' inputs X and output gradients dY
                             stay until its W (pending_weight_grad_bytes); every rank is
                             walked, as each holds back a different number of W.
    MoE layers               keep activations as a dense layer whose MLP is (top_k + S) f_e
                             wide (the active experts and the shared ones), plus what the
                             routing keeps (routing_bytes: the routed rows and the weighted
                             outputs, 2 e s b top_k h, whole over tp: every tp rank routes all
                             its tokens; the router's fp32 outputs; the permutation's indices)
    all-to-all bytes         per MoE layer and micro-batch, T top_k rows of h elements (T = b s
                             tokens of the rank) leave and come back in forward, and again in
                             backward: 4 e T top_k h sent per rank (+ 8 E bytes of counts),
                             (ep-1)/ep of them to other ranks when the routing is uniform
                             (docs/moe.md)
    ZeRO-3 working set       the gathered parameters of the layers in use and their gradients
                             before the reduce-scatter: (1 + prefetch) layers of the rank's
                             tensor-parallel shard, whole over dp
    FLOPs per iteration      F, the paper's count (nanomt.flops: 96 B s l h^2 (...), full
                             recompute), and the hardware FLOPs of the configured recompute;
                             an MoE layer counts its active experts only
    step time                hardware FLOPs / (GPUs x TFLOP/s per GPU); tokens/s = G s / time
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from nanomt.flops import flops_per_iteration, hardware_flops_per_iteration
from nanomt.memory import activation_bytes_per_layer, zero_formula_bytes
from nanomt.model.config import ModelConfig
from nanomt.parallel.pipeline.partition import global_chunk_index, rank_of_chunk
from nanomt.parallel.pipeline.zero_bubble import V_SHAPED, pipeline_slots
from nanomt.planner.params import chunk_layers, is_moe_layer, layer_params, params_on_pipeline_rank
from nanomt.planner.schedule_costs import SPLIT_BACKWARD, bubble_fraction, pass_times

GIB = 2**30
# (parameter, gradient, optimizer-state) bytes per parameter: fp32 keeps Adam's two moments;
# bf16/fp16 add an fp32 master copy (K = 12), and gradients are fp32 unless fp32_grads is off.
STATE_BYTES = {"fp32": 8, "bf16": 12, "fp16": 12}


@dataclass(frozen=True)
class PlanInputs:
    """A layout and its batch, as the training config states them (parallel.*, train.*)."""

    tp: int
    pp: int
    dp: int
    cp: int = 1
    ep: int = 1                     # parallel.ep: experts split over ep of the dp x cp ranks
    virtual_stages: int = 1
    schedule: str = "1f1b"
    zero_stage: int = 0
    zero3_prefetch: int = 1
    micro_batch: int = 1
    global_batch: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"         # train.activation_checkpointing
    precision: str = "bf16"
    fp32_grads: bool = True
    gpu_memory_gb: float = 80.0     # plan.gpu_memory_gb: what the layout must fit in
    tflops_per_gpu: float = 126.0   # plan.tflops_per_gpu: the throughput to estimate time at
    bucket_mb: float = 25.0         # parallel.bucket_size_mb
    overlap_param_gather: bool = False  # parallel.overlap_param_gather (ZeRO-1/2)

    @property
    def num_gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def expert_dp(self) -> int:
        """The ranks an expert's gradient is reduced (and ZeRO-sharded) over: dp cp / ep."""
        return self.dp * self.cp // self.ep


@dataclass
class Plan:
    inputs: PlanInputs
    params_total: int
    params_active: int                # of them, those one token runs through (MoE: top_k experts)
    params_per_rank: int              # the largest rank's (all its tp ranks hold as many)
    expert_params_per_rank: int       # of them, the stacked experts' (0 for a dense model)
    largest_pp_rank: int
    bytes_per_gpu: dict[str, float]   # weights, grads, optimizer, activations, zero3_gathered
    activation_pp_rank: int           # the pipeline rank with the most activations in flight
    microbatches_in_flight: int       # its most forwards awaiting their backward at once
    bubble_fraction: float
    flops_per_iteration: float        # F, the paper's formula (full recompute)
    hardware_flops_per_iteration: float
    model_flops_per_iteration: float
    all_to_all_bytes_per_step: float  # sent by one rank, all MoE layers (0 when ep = 1)
    step_time_s: float
    tokens_per_s: float
    advice: list[str] = field(default_factory=list)  # empty when the layout fits

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes_per_gpu.values())

    @property
    def fits(self) -> bool:
        return not self.advice


def layer_activation_bytes(cfg: ModelConfig, x: PlanInputs, moe: bool = False) -> float:
    """Bytes one layer (`moe`: a mixture-of-experts one) keeps per micro-batch for its backward
    (Korthikanti et al.'s terms, with the llama style's RMSNorm, RoPE and SwiGLU ones; an MoE
    layer as the module docstring says: a llama one's active experts are SwiGLU too)."""
    s, b, e = cfg.seq_len // x.cp, x.micro_batch, 4 if x.precision == "fp32" else 2
    routing = 0.0
    if moe and x.recompute != "full":  # full recompute keeps the layer's input only
        routing = routing_bytes(cfg, x, s * b)
    return routing + activation_bytes_per_layer(
        s, b, cfg.hidden_size, cfg.num_heads, tp=x.tp,
        sequence_parallel=x.sequence_parallel, recompute=x.recompute,
        dropout=cfg.dropout > 0 or cfg.attention_dropout > 0, flash=True, bytes_per_element=e,
        ffn_hidden=mlp_width(cfg, moe), style=cfg.style)


def mlp_width(cfg: ModelConfig, moe: bool) -> int:
    """The MLP width a token runs through: the dense f, or an MoE layer's active (k + S) f_e."""
    if not moe:
        return cfg.ffn_hidden_size
    return (cfg.moe.top_k + cfg.moe.shared_experts) * cfg.moe.ffn_hidden_size


def widest_mlp_width(cfg: ModelConfig) -> int:
    """The widest mlp_width among the model's layers (dense ones, MoE ones or both)."""
    kinds = {is_moe_layer(cfg, i) for i in range(cfg.num_layers)}
    return max(mlp_width(cfg, moe) for moe in kinds)


def routing_bytes(cfg: ModelConfig, x: PlanInputs, tokens: int) -> float:
    """What an MoE layer keeps for its backward beyond a dense layer with an MLP of its active
    width (module docstring): the T k routed rows entering the experts and the k weighted
    outputs, 2 e T k h; the router's fp32 logits and probabilities, 8 T E; about four int64
    indices per assignment for the permutation, 32 T k; and, under sequence parallelism, the
    gathered tokens the router reads, e T h (every tp rank routes them all)."""
    e, k, h = 4 if x.precision == "fp32" else 2, cfg.moe.top_k, cfg.hidden_size
    kept = 2 * e * tokens * k * h + 8 * tokens * cfg.moe.num_experts + 32 * tokens * k
    return kept + (e * tokens * h if x.sequence_parallel and x.tp > 1 else 0)


def chunk_activation_bytes(cfg: ModelConfig, x: PlanInputs, chunk: int, num_chunks: int) -> float:
    """Bytes one micro-batch leaves in chunk `chunk` of `num_chunks` until its backward."""
    s, b, h, t = cfg.seq_len // x.cp, x.micro_batch, cfg.hidden_size, x.tp
    e = 4 if x.precision == "fp32" else 2
    whole = e * s * b * h / (t if x.sequence_parallel else 1)
    layers = chunk_layers(cfg, chunk, num_chunks)
    moe_layers = sum(is_moe_layer(cfg, i) for i in layers)
    total = (len(layers) - moe_layers) * layer_activation_bytes(cfg, x) + (
        moe_layers * layer_activation_bytes(cfg, x, moe=True) if moe_layers else 0.0)
    if chunk == num_chunks - 1:
        total += 2 * whole + logits_bytes(cfg, x)
    return total


def logits_bytes(cfg: ModelConfig, x: PlanInputs) -> float:
    """One micro-batch's logits shard in fp32: 4 s b V_padded / t."""
    return 4 * (cfg.seq_len // x.cp) * x.micro_batch * cfg.padded_vocab_size(x.tp) / x.tp


def backward_working_bytes(cfg: ModelConfig, x: PlanInputs) -> float:
    """Gradients in flight through one MLP (the widest), and the pipeline's receive buffers:
    the backward's gradient, [s/t, b, h] under SP, else whole once gathered over tp (the wire
    carries 1/t of it, all-gathered when the pass takes it: the piece is freed as the whole
    appears), and the other receive of an interleaved forward-backward pair (posting.py), still
    a 1/t piece."""
    s, b, h, t = cfg.seq_len // x.cp, x.micro_batch, cfg.hidden_size, x.tp
    e = 4 if x.precision == "fp32" else 2
    current = e * s * b * h / (t if x.sequence_parallel else 1)
    receive = current + e * s * b * h / t if x.pp > 1 else 0
    return 2 * e * s * b * widest_mlp_width(cfg) / t + receive


def pending_weight_grad_bytes(cfg: ModelConfig, x: PlanInputs, chunk: int,
                              num_chunks: int) -> float:
    """Bytes one micro-batch holds in chunk `chunk` between its B and its W under a
    zero-bubble schedule: every linear's input X and output gradient dY, kept for dW = dY^T X
    (nanomt.parallel.weight_grad_store), whatever the recompute. Per layer, of e s b x: the
    column linears' (QKV, fc1) inputs h each (/t under sequence parallelism) and outputs
    3h/t and f/t (2f/t gated); the row linears' (attention out, fc2) inputs h/t and f/t and
    output gradients h each, whole (the backward of g, or of SP's reduce-scatter, gives dY
    whole). The last chunk adds the head's: input h (/t under SP), output V_padded/t."""
    s, b, h, t = cfg.seq_len // x.cp, x.micro_batch, cfg.hidden_size, x.tp
    f, e = cfg.ffn_hidden_size, 4 if x.precision == "fp32" else 2
    t_sp = t if x.sequence_parallel else 1
    fc1_out = 2 * f if cfg.style == "llama" else f
    per_layer = 2 * h / t_sp + (h + f) / t + (3 * h + fc1_out) / t + 2 * h
    total = cfg.num_layers // num_chunks * per_layer
    if chunk == num_chunks - 1:
        total += h / t_sp + cfg.padded_vocab_size(t) / t
    return e * s * b * total


@functools.lru_cache(maxsize=65536)
def in_flight_counts(schedule: str, pp: int, rank: int, m: int,
                     v: int) -> tuple[tuple[int, int, int, int], ...]:
    """The (passes between F and B, of them through the model's last chunk, passes between B
    and W, of them through the last chunk) that rank `rank` reaches walking its schedule,
    those no other reached exceeds in all four: a chunk's bytes per micro-batch are the same
    except the last's, so the peak is at one of these. Without W passes (1F1B, GPipe) the
    last two stay 0. Cached: the search asks for the same schedules many times."""
    v_shape = schedule in V_SHAPED
    last_chunk = next((j for j in range(v)
                       if global_chunk_index(j, rank, pp, v_shape) == pp * v - 1), None)
    seen, state = set(), [0, 0, 0, 0]
    for op in (op for slot in pipeline_slots(schedule, pp, rank, m, v) for op in slot):
        last = op.chunk == last_chunk
        moves = {"F": ((0, 1),), "B": ((0, -1), (2, 1)), "W": ((2, -1),)}[op.kind]
        if op.kind == "B" and schedule not in SPLIT_BACKWARD:
            moves = ((0, -1),)
        for index, sign in moves:
            state[index] += sign
            state[index + 1] += sign if last else 0
        seen.add(tuple(state))
    return tuple(a for a in seen
                 if not any(b != a and all(i >= j for i, j in zip(b, a)) for b in seen))


def peak_activations(cfg: ModelConfig, x: PlanInputs) -> tuple[float, int, int]:
    """(most activation bytes on any pipeline rank, that rank, its most micro-batches in
    flight, F run and B, or W, not yet): the kept activations at their peak, plus the
    backward's working set. A zero-bubble schedule's ranks each hold differently many W
    back: all are walked."""
    p, v, m = x.pp, x.virtual_stages, x.num_microbatches
    # the chunks but the last keep as many bytes (dense), or (MoE layers unevenly spread) at most
    others = range(p * v - 1) if cfg.moe else range(min(p * v - 1, 1))
    chunk = max((chunk_activation_bytes(cfg, x, c, p * v) for c in others), default=0.0)
    extra = chunk_activation_bytes(cfg, x, p * v - 1, p * v) - chunk
    pending = pending_weight_grad_bytes(cfg, x, 0, p * v) if p * v > 1 else 0.0
    pending_extra = pending_weight_grad_bytes(cfg, x, p * v - 1, p * v) - pending
    head_rank = rank_of_chunk(p * v - 1, p, x.schedule in V_SHAPED)
    ranks = range(p) if x.schedule in SPLIT_BACKWARD else sorted({0, head_rank})
    best = (0.0, 0, 0)
    for rank in ranks:  # 1F1B: the first holds the most passes, the last the head
        counts = in_flight_counts(x.schedule, p, rank, m, v)
        peak = max(n * chunk + k * extra + w * pending + wk * pending_extra
                   for n, k, w, wk in counts)
        peak += logits_bytes(cfg, x) if rank == head_rank else 0.0
        if peak > best[0]:
            best = (peak, rank, max(n + w for n, _, w, _ in counts))
    return best[0] + backward_working_bytes(cfg, x), best[1], best[2]


def element_bytes(x: PlanInputs) -> tuple[int, int]:
    """(bytes of a parameter, of a gradient) in the run's precision."""
    return (4 if x.precision == "fp32" else 2,
            4 if x.precision == "fp32" or x.fp32_grads else 2)


def model_state_bytes(psi_dense: int, psi_experts: int, x: PlanInputs) -> dict[str, float]:
    """ZeRO's formulas for the rank's dense parameters over dp cp ranks plus those for its
    stacked experts over the dp cp / ep ranks that hold the same experts."""
    param_bytes, grad_bytes = element_bytes(x)
    dense, experts = (zero_formula_bytes(psi, ranks, x.zero_stage, param_bytes, grad_bytes,
                                         STATE_BYTES[x.precision])
                      for psi, ranks in ((psi_dense, x.dp * x.cp), (psi_experts, x.expert_dp)))
    return {kind: dense[kind] + experts[kind] for kind in dense}


def moe_layers_on_pipeline_rank(cfg: ModelConfig, x: PlanInputs, pp_rank: int) -> int:
    """The MoE layers of pipeline rank `pp_rank`'s chunks."""
    chunks = x.pp * x.virtual_stages
    v_shape = x.schedule in V_SHAPED
    return sum(is_moe_layer(cfg, i) for j in range(x.virtual_stages)
               for i in chunk_layers(cfg, global_chunk_index(j, pp_rank, x.pp, v_shape), chunks))


def all_to_all_bytes_per_step(cfg: ModelConfig, x: PlanInputs, pp_rank: int) -> float:
    """Bytes one rank of pipeline rank `pp_rank` hands to all_to_all_single in one step, the
    mean over its ep group: per MoE layer and micro-batch each forward sends the T top_k rows
    out and back, 2 e T top_k h (T = b s / cp tokens), and the E int64 counts, 8 E; the
    backward the rows' gradients, 2 e T top_k h (module docstring); 0 without expert
    parallelism. Full recompute runs the forward twice."""
    if x.ep == 1 or not cfg.moe:
        return 0.0
    tokens = x.micro_batch * cfg.seq_len // x.cp
    rows = 2 * element_bytes(x)[0] * tokens * cfg.moe.top_k * cfg.hidden_size
    forwards = 2 if x.recompute == "full" else 1
    one = forwards * (rows + 8 * cfg.moe.num_experts) + rows
    return x.num_microbatches * moe_layers_on_pipeline_rank(cfg, x, pp_rank) * one


def make_plan(cfg: ModelConfig, x: PlanInputs) -> Plan:
    """The plan of layout `x` for model `cfg` (module docstring)."""
    # the first rank adds the embedding, the last the head; those between hold layers only
    edges = sorted({0, x.pp - 1})
    per_rank = [params_on_pipeline_rank(cfg, x.tp, x.pp, x.virtual_stages, r, x.ep,
                                        v_shape=x.schedule in V_SHAPED) for r in edges]
    psi = max(per_rank)
    largest = edges[per_rank.index(psi)]
    psi_experts = params_on_pipeline_rank(cfg, x.tp, x.pp, x.virtual_stages, largest, x.ep,
                                          experts_only=True, v_shape=x.schedule in V_SHAPED)
    state = model_state_bytes(psi - psi_experts, psi_experts, x)
    activations, activation_rank, in_flight = peak_activations(cfg, x)
    gathered = 0.0
    if x.zero_stage >= 3:
        widest = max(layer_params(cfg, x.tp, i, x.ep) for i in range(cfg.num_layers))
        gathered = (1 + x.zero3_prefetch) * widest * sum(element_bytes(x))
    G, padded = x.global_batch, cfg.padded_vocab_size(x.tp)
    hardware = hardware_flops_per_iteration(cfg, G, x.recompute, padded)
    step_time = hardware / (x.num_gpus * x.tflops_per_gpu * 1e12)
    plan = Plan(
        inputs=x, params_total=cfg.num_parameters(),
        params_active=cfg.num_parameters(active=True), params_per_rank=psi,
        expert_params_per_rank=psi_experts, largest_pp_rank=largest,
        bytes_per_gpu={"weights": state["params"], "grads": state["grads"],
                       "optimizer": state["optimizer_state"], "activations": activations,
                       "zero3_gathered": gathered},
        activation_pp_rank=activation_rank, microbatches_in_flight=in_flight,
        bubble_fraction=bubble_fraction(x.schedule, x.pp, x.num_microbatches, x.virtual_stages,
                                        pass_times(x.recompute)),
        flops_per_iteration=flops_per_iteration(cfg, G, padded, full_recompute=True),
        hardware_flops_per_iteration=hardware,
        model_flops_per_iteration=flops_per_iteration(cfg, G, padded),
        all_to_all_bytes_per_step=all_to_all_bytes_per_step(cfg, x, largest),
        step_time_s=step_time, tokens_per_s=G * cfg.seq_len / step_time)
    plan.advice = advice(plan)
    return plan


def advice(plan: Plan) -> list[str]:
    """What to change when the plan does not fit plan.gpu_memory_gb (empty when it fits)."""
    x, b = plan.inputs, plan.bytes_per_gpu
    if plan.total_bytes <= x.gpu_memory_gb * GIB:
        return []
    state = b["weights"] + b["grads"] + b["optimizer"]
    tips = [f"needs {plan.total_bytes / GIB:.1f} GiB per GPU, more than plan.gpu_memory_gb="
            f"{x.gpu_memory_gb:g}"]
    if b["activations"] > state:
        if x.recompute != "full":
            tips.append("activations dominate: set train.activation_checkpointing=full "
                        "(or selective)")
        if x.tp > 1 and not x.sequence_parallel:
            tips.append("set parallel.sequence_parallel=true (activations / tp)")
        tips.append(f"raise parallel.cp (now {x.cp}): activations / cp")
        if x.micro_batch > 1:
            tips.append("lower train.micro_batch_size")
    else:
        if x.zero_stage < 3 and x.dp * x.cp > 1:
            tips.append(f"raise parallel.zero_stage (now {x.zero_stage}) to shard model state "
                        "over dp")
        if plan.expert_params_per_rank and x.ep < x.dp * x.cp:
            tips.append(f"raise parallel.ep (now {x.ep}): E/ep experts per GPU")
        tips.append("raise parallel.tp or parallel.pp (fewer parameters per GPU)")
    return tips
