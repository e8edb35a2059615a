"""A mixture-of-experts MLP: each token goes through k of E expert MLPs (Shazeer et al. 2017;
GShard, Lepikhin et al. 2020; Mixtral, Jiang et al. 2024), dropless.

    logits = x W_r^T (fp32)                  the router, [T, E]
    p      = softmax(logits) over all E       top-k of p, renormalised to sum to one (Mixtral's
                                              choice: the softmax sees every expert, the k
                                              weights of a token are p_i / sum of its top-k p)
    y_t    = sum over its k experts i of w_ti * Expert_i(x_t)   (+ SharedMLP(x_t))

Every token reaches its k experts (no capacity, no token dropped: rows per expert vary, and
the experts run on exactly the rows routed to them). Experts are GeLU (style gpt) or SwiGLU
(llama) MLPs without biases, stacked: experts.fc1.weight [E, ffn, h] (SwiGLU [E, 2, ffn, h] =
[gate; up]), experts.fc2.weight [E, h, ffn]. The route to the experts' ranks and back is
nanomt.parallel.expert_parallel's.

Two losses keep the router healthy, over all T = b s tokens of the micro-batch (under context
parallelism the sums run over the cp group; under sequence parallelism the layer gathers the
tokens of its tp group first), so they equal one process's:

    load balancing (Switch, Fedus et al. 2021):  aux = c_aux * E * sum_e f_e P_e,
        f_e = (assignments to e) / (T k),  P_e = mean over tokens of p_e
    router z-loss (ST-MoE, Zoph et al. 2022):     z = c_z * mean_t logsumexp(logits_t)^2

They enter backward with the main loss's scale (1/m, fp16's loss scale), through an identity
on the layer's output whose backward also starts the losses' backward (`_AddAuxLossGradient`):
no schedule needs to know about them, on any pipeline stage.

Tensor parallelism splits every expert along its ffn like the dense MLP: its input passes f
and its output rows g before they are weighted, so the routing weights' gradient, the router's
and the losses' are complete and equal on every tp rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanomt.model.checkpointing import recomputing
from nanomt.model.config import ModelConfig
from nanomt.parallel import comm
from nanomt.parallel.blockwise_init import NormalInit
from nanomt.parallel.comm import Group
from nanomt.parallel.deferred_init import new_parameter
from nanomt.parallel.expert_parallel import (
    combine,
    dispatch,
    gather_sequence,
    keep_my_sequence_shard,
    sum_over_group,
)
from nanomt.parallel.mappings import (
    copy_to_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
)
from nanomt.parallel.tensor_parallel import my_slice


class _AddAuxLossGradient(torch.autograd.Function):
    """Identity on `output`; backward also hands `aux_loss` the gradient `scale`, so the
    router's losses are differentiated with the main loss's scale wherever the layer is."""

    @staticmethod
    def forward(ctx, output, aux_loss, scale):
        ctx.scale = scale
        ctx.aux_shape_dtype = aux_loss.shape, aux_loss.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        shape, dtype = ctx.aux_shape_dtype
        scale = torch.as_tensor(ctx.scale, dtype=dtype, device=grad_output.device)
        return grad_output, scale.expand(shape), None


class Router(nn.Module):
    """logits = x W_r^T in fp32; W_r [E, h] replicated over tp and ep."""

    def __init__(self, num_experts: int, hidden_size: int, init: NormalInit):
        super().__init__()
        shape = (num_experts, hidden_size)
        self.initializers = {"weight": lambda: init.slices(shape, 0, range(num_experts))}
        self.weight = new_parameter(self.initializers["weight"], shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class ExpertWeights(nn.Module):
    """One stacked weight of this rank's experts: [E/ep, *per_expert_shape] with dim
    `tp_split_dim` split over tp. Expert e's values are drawn from its own streams
    (`init` "<name>.<e>"), so they do not depend on the layout."""

    expert = True  # ParamInfo.expert (nanomt.model.param_records)

    def __init__(self, per_expert: tuple[int, ...], split: int, experts: range,
                 tp_group: Group, init: NormalInit):
        super().__init__()
        rows = my_slice(per_expert[split], tp_group)
        local = per_expert[:split] + (len(rows),) + per_expert[split + 1:]

        def draw() -> torch.Tensor:
            return torch.stack([init.child(str(e)).slices(per_expert, split, rows)
                                for e in experts])

        self.initializers = {"weight": draw}
        self.weight = new_parameter(draw, (len(experts),) + local)
        self.tp_split_dims = {"weight": split + 1}


class Experts(nn.Module):
    """This rank's experts, each an MLP without biases on its own rows."""

    def __init__(self, cfg: ModelConfig, experts: range, tp_group: Group, init: NormalInit,
                 out_init: NormalInit):
        super().__init__()
        h, f = cfg.hidden_size, cfg.moe.ffn_hidden_size
        self.swiglu = cfg.style == "llama"
        fc1_shape, fc1_split = ((2, f, h), 1) if self.swiglu else ((f, h), 0)
        self.fc1 = ExpertWeights(fc1_shape, fc1_split, experts, tp_group, init.child("fc1"))
        self.fc2 = ExpertWeights((h, f), 1, experts, tp_group, out_init.child("fc2"))

    def forward(self, rows: torch.Tensor, rows_per_expert: list[int]) -> torch.Tensor:
        """rows [R, h] grouped by local expert -> this tp rank's partial outputs [R, h]."""
        outputs = []
        for e, x in enumerate(rows.split(rows_per_expert)):
            y = x @ self.fc1.weight[e].reshape(-1, x.shape[-1]).t()
            if self.swiglu:
                gate, up = y.chunk(2, dim=-1)
                y = F.silu(gate) * up
            else:
                y = F.gelu(y, approximate="tanh")
            outputs.append(y @ self.fc2.weight[e].t())
        return torch.cat(outputs)


def router_losses(logits: torch.Tensor, probs: torch.Tensor, expert_ids: torch.Tensor,
                  num_experts: int, aux_coef: float, z_coef: float, group: Group
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss, assignments per expert [E]) over the micro-batch's tokens:
    this rank's [T_local, E] router outputs, summed over `group` (cp) to all T tokens."""
    counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).float()
    counts = comm.all_reduce(counts, group)  # not differentiable: counts only
    local = torch.cat([probs.sum(dim=0), torch.logsumexp(logits, dim=-1).square().sum()[None],
                       torch.ones(1, device=probs.device) * probs.shape[0]])
    total = sum_over_group(local, group)
    prob_sums, z_sum, tokens = total[:num_experts], total[num_experts], total[-1].detach()
    k = expert_ids.shape[1]
    aux = aux_coef * num_experts * ((counts / (tokens * k)) * (prob_sums / tokens)).sum()
    return aux, z_coef * z_sum / tokens, counts


class MoEMLP(nn.Module):
    """The MoE layer of the module docstring, or this rank's piece of it (its E/ep experts,
    their ffn/t columns)."""

    def __init__(self, cfg: ModelConfig, tp_group: Group, init: NormalInit,
                 out_init: NormalInit, sequence_parallel: bool, ep_group: Group = None,
                 cp_group: Group = None, shared: nn.Module | None = None, layer: int = 0):
        super().__init__()
        moe = cfg.moe
        self.layer = layer  # its global index: the metrics name it
        ep_rank, ep = comm.rank_and_size(ep_group)
        per_rank = moe.num_experts // ep
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.aux_coef, self.z_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.tp_group, self.ep_group, self.cp_group = tp_group, ep_group, cp_group
        self.sequence_parallel = sequence_parallel and comm.group_size(tp_group) > 1
        self.router = Router(moe.num_experts, cfg.hidden_size, init.child("router"))
        self.experts = Experts(cfg, range(ep_rank * per_rank, (ep_rank + 1) * per_rank),
                               tp_group, init.child("experts"), out_init.child("experts"))
        self.shared = shared  # a dense MLP (nanomt.model.layers.ParallelMLP) or None
        self.aux_loss_scale: float | torch.Tensor = 1.0  # set_aux_loss_scale
        self.reset_statistics()

    def reset_statistics(self) -> None:
        """The step's sums: [aux loss, z-loss, assignments per expert (E)], micro-batches."""
        self.step_sums: torch.Tensor | None = None
        self.micro_batches = 0

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, h] -> (routing weights [T, k], expert ids [T, k], router loss to backprop;
        None without autograd)."""
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1)
        top_probs, expert_ids = probs.topk(self.top_k, dim=-1)
        weights = top_probs / top_probs.sum(dim=-1, keepdim=True)  # Mixtral: renormalised
        if not torch.is_grad_enabled():  # evaluation, generation: no losses, no collectives
            return weights, expert_ids, None
        aux, z, counts = router_losses(logits, probs, expert_ids, self.num_experts,
                                       self.aux_coef, self.z_coef, self.cp_group)
        self.note_statistics(aux, z, counts)
        return weights, expert_ids, aux + z

    def note_statistics(self, aux: torch.Tensor, z: torch.Tensor, counts: torch.Tensor) -> None:
        """Add a training micro-batch's losses and load to the step's sums (on the device)."""
        if not (self.training and torch.is_grad_enabled()) or recomputing():
            return
        values = torch.cat([aux.detach()[None], z.detach()[None], counts])
        self.step_sums = values if self.step_sums is None else self.step_sums + values
        self.micro_batches += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared(x) if self.shared is not None else None
        if self.sequence_parallel:  # every tp rank routes all the tokens of its tp group
            x = gather_sequence(x, self.tp_group)
        s, b, h = x.shape
        tokens = x.reshape(s * b, h)
        weights, expert_ids, router_loss = self.route(tokens)
        rows, route = dispatch(copy_to_tensor_parallel_region(tokens, self.tp_group),
                               expert_ids, self.num_experts, self.ep_group)
        outputs = self.experts(rows, route.rows_per_local_expert)
        outputs = reduce_from_tensor_parallel_region(outputs, self.tp_group)
        y = combine(outputs, weights, route).view(s, b, h)
        if self.sequence_parallel:
            y = keep_my_sequence_shard(y, self.tp_group)
        if router_loss is not None and router_loss.requires_grad:
            y = _AddAuxLossGradient.apply(y, router_loss, self.aux_loss_scale)
        return y if shared is None else y + shared


def moe_layers(model_chunks: list[nn.Module]) -> list[MoEMLP]:
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, MoEMLP)]


def step_statistics(model_chunks: list[nn.Module], cfg: ModelConfig, dp_cp: tuple[int, int],
                    device: torch.device) -> torch.Tensor | None:
    """This rank's share of the step's router statistics, [MoE layers of the model, 2 + E]:
    per layer (in global order; zeros for layers on other pipeline stages) the load-balancing
    loss and z-loss, averaged over its micro-batches, / (dp cp), and the assignments per
    expert, / cp (every cp rank counted the whole micro-batch). Summed over every rank (dp x cp
    and pp; tp ranks hold equal values) they are the batch's mean losses and its assignments.
    Resets the layers' sums; None for a dense model."""
    if cfg.moe is None:
        return None
    dp, cp = dp_cp
    index = {layer: row for row, layer in enumerate(
        i for i in range(cfg.num_layers) if cfg.moe.is_moe_layer(i))}
    table = torch.zeros(len(index), 2 + cfg.moe.num_experts, device=device)
    for layer in moe_layers(model_chunks):
        if layer.step_sums is not None:
            sums = layer.step_sums.to(device)
            table[index[layer.layer]] = torch.cat([sums[:2] / (layer.micro_batches * dp * cp),
                                                   sums[2:] / cp])
        layer.reset_statistics()
    return table


def statistics_record(table: list[float], cfg: ModelConfig) -> dict:
    """The metrics record's MoE entries from step_statistics' table summed over the ranks:
    moe_aux_loss and moe_z_loss (summed over the MoE layers: what the objective adds per
    micro-batch) and per MoE layer i `moe_expert_load/layer_i` = max / mean assignments per
    expert over the step's batch (1: balanced; E / k at worst)."""
    E = cfg.moe.num_experts
    rows = [table[r * (2 + E):(r + 1) * (2 + E)] for r in range(len(table) // (2 + E))]
    layers = [i for i in range(cfg.num_layers) if cfg.moe.is_moe_layer(i)]
    record = {"moe_aux_loss": sum(row[0] for row in rows),
              "moe_z_loss": sum(row[1] for row in rows)}
    for layer, row in zip(layers, rows):
        counts = row[2:]
        mean = sum(counts) / E
        record[f"moe_expert_load/layer_{layer}"] = max(counts) / mean if mean else None
    return record


def set_aux_loss_scale(model_chunks: list[nn.Module], scale: float | torch.Tensor) -> None:
    """The factor the schedules put on each micro-batch's loss (loss_scale / m): the router's
    losses get the same. Call before the step's forward-backward."""
    for layer in moe_layers(model_chunks):
        layer.aux_loss_scale = scale
