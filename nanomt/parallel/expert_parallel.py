"""Expert parallelism: each token travels to the ranks holding its experts and back.

A mixture-of-experts layer (nanomt.model.moe) sends each of its T tokens to k of E experts.
With the experts split over an ep group (ep rank r holds experts [r E/ep, (r+1) E/ep)), the
route of GShard (Lepikhin et al. 2020), dropless:

    permute    sort the T k (token, expert) assignments by expert: rows grouped by expert, so
               the rows for ep rank r are one contiguous block
    counts     all_to_all_single of the per-expert counts [E]: every rank learns how many rows
               each other rank sends to each of its experts (the uneven splits)
    dispatch   all_to_all_single of the rows [T k, h] with those splits, then regroup the
               received rows (source-major) by local expert
    experts    each local expert on its rows (nanomt.model.moe)
    return     the reverse regroup and all_to_all_single: every row comes home
    combine    unpermute to [T, k, h] and take the weighted sum over the k experts

With ep = 1 both all-to-alls are skipped. Dropless has one price: the rows per expert are
known only after routing, and the host must know them (to size the exchange and split the rows
among the experts), so each layer reads its counts once per micro-batch (one small copy; with
ep > 1 the sent and received counts together), as every dropless implementation does. The backward of an all-to-all is the all-to-all with
the splits swapped (rows go back where they came from), so gradients follow the same route.

Traffic per MoE layer and micro-batch, on each rank (fp32: 4 bytes an element; the rows
are the layer's activations, of the model's dtype), with N = T k the rows this rank routes and
R the rows it receives (R = sum of the counts sent to it), E the number of experts:

    forward   counts: E int64 sent;  dispatch: N h;  return: R h elements sent
    backward  dispatch's reverse: R h;  return's reverse: N h elements sent

so a rank sends 8 E + 2 (N + R) h * bytes_per_element bytes per layer and micro-batch (summed
over the ep group, N and R total the same: 2 * 2 * ep * T k h * bytes when every rank has T
tokens), including the rows an expert on the sender's own rank gets (all_to_all_single
copies them locally, and tests/comm_counting.py counts what is passed to it).

The helpers below also keep the layer's route the same under sequence parallelism:
`gather_sequence` gives every tp rank all the tokens of its tp group (the router's gradient is
then complete on each), `keep_my_sequence_shard` hands each its shard back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanomt.parallel import comm
from nanomt.parallel.comm import Group
from nanomt.parallel.mappings import SEQ_DIM


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks with uneven splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return comm.all_to_all_single(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return (comm.all_to_all_single(grad.contiguous(), input_splits, output_splits,
                                       ctx.group), None, None, None)


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group: Group) -> torch.Tensor:
    """Differentiable all_to_all_single (comm.all_to_all_single's split convention)."""
    if comm.group_size(group) == 1:
        return x
    return _AllToAll.apply(x, output_splits, input_splits, group)


class _SumOverGroup(torch.autograd.Function):
    """y = sum of x over the group on every rank. Every rank's y depends on every rank's x, so
    the gradient of x is the sum of the gradients of every rank's y."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad.contiguous().clone(), ctx.group), None


def sum_over_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """A differentiable all-reduce (sum) of x over `group`."""
    return x if comm.group_size(group) == 1 else _SumOverGroup.apply(x, group)


class _GatherSequence(torch.autograd.Function):
    """All-gather the sequence; the gradient arriving is already complete on every rank (all of
    them computed the same thing from the same tokens): keep my shard of it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather(x, group, dim=SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        rank, size = comm.rank_and_size(ctx.group)
        return grad.chunk(size, dim=SEQ_DIM)[rank].contiguous(), None


class _KeepMySequenceShard(torch.autograd.Function):
    """My shard of a sequence every rank holds whole; backward all-gathers the shards' grads."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        rank, size = comm.rank_and_size(group)
        return x.chunk(size, dim=SEQ_DIM)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad.contiguous(), ctx.group, dim=SEQ_DIM), None


def gather_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[s/t, b, h] -> [s, b, h] on every rank of `group`, for a block that then computes the
    same on every rank (its input gradient is complete there: backward keeps my shard)."""
    return x if comm.group_size(group) == 1 else _GatherSequence.apply(x, group)


def keep_my_sequence_shard(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[s, b, h], equal on every rank -> my shard [s/t, b, h] (backward: all-gather)."""
    return x if comm.group_size(group) == 1 else _KeepMySequenceShard.apply(x, group)


@dataclass
class Route:
    """Where each of a layer's T k rows went, to bring them back (module docstring)."""

    order: torch.Tensor            # [T k] assignment indices (token * k + slot), by expert
    rows_per_local_expert: list[int]  # rows each of my experts received, all sources together
    send_splits: list[int]         # rows I send to each ep rank
    receive_splits: list[int]      # rows each ep rank sends me
    regroup: torch.Tensor | None   # received (source-major) rows -> local-expert order; ep > 1
    group: Group


def dispatch(tokens: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
             ep_group: Group) -> tuple[torch.Tensor, Route]:
    """tokens [T, h], expert_ids [T, k] -> (my experts' rows [R, h], grouped by local expert in
    expert order, and the Route back). The splits are read on the host once, as one copy of the
    counts: an uneven all-to-all needs them there."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = tokens[order // k]  # [T k, h], grouped by expert
    counts = torch.bincount(flat, minlength=num_experts)  # [E] rows I send to each expert
    ep = comm.group_size(ep_group)
    if ep == 1:
        per_expert = counts.tolist()
        return rows, Route(order, per_expert, [len(flat)], [len(flat)], None, ep_group)
    local = num_experts // ep
    received = comm.all_to_all_single(counts, [local] * ep, [local] * ep, ep_group)
    sent_and_received = torch.cat([counts, received]).tolist()  # the host read
    counts_host = torch.tensor(sent_and_received[:num_experts]).view(ep, local)
    received_host = torch.tensor(sent_and_received[num_experts:]).view(ep, local)
    send_splits, receive_splits = counts_host.sum(1).tolist(), received_host.sum(1).tolist()
    arrived = all_to_all(rows, receive_splits, send_splits, ep_group)  # source-major
    expert_of_row = torch.repeat_interleave(torch.arange(local).repeat(ep),
                                            received_host.reshape(-1))
    regroup = torch.argsort(expert_of_row, stable=True).to(tokens.device)
    route = Route(order, received_host.sum(0).tolist(), send_splits, receive_splits, regroup,
                  ep_group)
    return arrived[regroup], route


def combine(expert_rows: torch.Tensor, weights: torch.Tensor, route: Route) -> torch.Tensor:
    """My experts' outputs [R, h] (dispatch's order) and the routing weights [T, k] -> the
    weighted sum over each token's k experts [T, h]: the rows go home, are unpermuted and
    summed in slot order (deterministic: no scattered adds)."""
    if route.regroup is not None:
        source_major = expert_rows[torch.argsort(route.regroup)]
        expert_rows = all_to_all(source_major, route.send_splits, route.receive_splits,
                                 route.group)
    per_assignment = expert_rows[torch.argsort(route.order)]  # [T k, h], token-major
    T, k = weights.shape
    per_slot = per_assignment.view(T, k, -1)
    return (per_slot * weights.unsqueeze(-1).to(per_slot.dtype)).sum(dim=1)
