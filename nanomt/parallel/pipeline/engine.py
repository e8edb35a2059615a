"""Running a pipeline schedule: one rank's forward and backward passes and the messages between.

The schedule (schedules.py) says in which order this rank runs its passes, posting.py which
messages it exchanges between them; this module runs both:

  exchange   post one batch on the pipeline communicator (p2p.py): the sends of the passes just
             run, the receives of the passes next; wait for all of it. A sent output's data is
             then freed: only its grad_fn, and the tensors that saves, wait for the backward
             (Megatron's deallocate_output_tensor), so k micro-batches in flight cost k
             micro-batches of saved activations and no more.
  forward    F(i, chunk): output = chunk(tokens, or the activation received from the previous
             chunk); the last chunk computes the loss, scaled by 1/m as in gradient accumulation.
  backward   B(i, chunk): backward from the output with the gradient received from the next
             chunk (or from the loss on the last chunk); the input's gradient is sent back.

Gradients accumulate in .grad over all micro-batches, and the tied word embedding's two copies
(first and last stage) sum theirs at the end: the single-process gradient of the mean loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nanomt.parallel.comm import group_size
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.pipeline.agreement import agree_on_schedule, check_outgoing
from nanomt.parallel.pipeline.p2p import PipelineP2P
from nanomt.parallel.pipeline.partition import allreduce_embedding_grads
from nanomt.parallel.pipeline.posting import Exchange, Transfer, checked_plans
from nanomt.parallel.pipeline.scatter_gather import ScatterGatherP2P
from nanomt.parallel.pipeline.schedules import PipelineOp
from nanomt.parallel.pipeline.timeline import Timeline, maybe_span

MicroBatch = tuple[torch.Tensor, torch.Tensor]


def deallocate_output(output: torch.Tensor) -> None:
    """Free the data of a sent output; its grad_fn (the graph) stays for the backward.

    The new data is one element expanded to the output's shape, so that
    torch.autograd.backward(output, grad) still sees matching shapes. A view would keep its
    base's storage alive, so only a tensor that owns its data is freed."""
    assert output._base is None, "deallocate_output needs a tensor that owns its storage"
    output.data = torch.empty((1,), device=output.device, dtype=output.dtype).expand(output.shape)


@dataclass
class InFlight:
    """A micro-batch's pass through one chunk, between its forward and its backward."""

    input: torch.Tensor | None  # the received activation (None on the first chunk)
    output: torch.Tensor  # chunk output (data freed once sent) or the scaled loss (last chunk)


class PipelineStep:
    """One rank's passes of one optimizer step (or evaluation, forward_only)."""

    def __init__(self, model_chunks: Sequence[nn.Module], micro_batches: Sequence[MicroBatch],
                 comm: PipelineP2P, plan: Sequence[Exchange], forward_only: bool,
                 timeline: Timeline | None, loss_scale: float | torch.Tensor = 1.0):
        self.chunks, self.micro_batches, self.plan = model_chunks, micro_batches, plan
        self.comm, self.forward_only, self.timeline = comm, forward_only, timeline
        self.pp, self.pp_rank = comm.grid.pp_size, comm.grid.pp_rank
        self.m, self.loss_scale = len(micro_batches), loss_scale  # fp16: backward from S*loss/m
        self.last_chunk = self.pp * len(model_chunks) - 1
        self.in_flight: dict[tuple[int, int], InFlight] = {}
        self.received: dict[PipelineOp, torch.Tensor] = {}  # arrived messages, by the pass
        self.outgoing: dict[PipelineOp, torch.Tensor] = {}  # what a pass sends, until sent
        self.loss_sum = torch.zeros((), device=micro_batches[0][0].device)

    def global_chunk(self, op: PipelineOp) -> int:
        return op.chunk * self.pp + self.pp_rank

    def run(self) -> torch.Tensor:
        for exchange in self.plan:
            if exchange.transfers:
                self.exchange(exchange.transfers)
            for op in exchange.passes:
                self.run_pass(op)
        return self.loss_sum

    def run_pass(self, op: PipelineOp) -> None:
        with maybe_span(self.timeline, op.kind, op.microbatch, op.chunk):
            self.forward(op) if op.kind == "F" else self.backward(op)

    def exchange(self, transfers: tuple[Transfer, ...]) -> None:
        """Post one batch, wait for all of it, then free the data of the outputs it sent."""
        sending = {t.op: self.outgoing.pop(t.op) for t in transfers if t.is_send}
        batch, buffers = self.comm.post(transfers, sending)
        with maybe_span(self.timeline, "wait"):
            batch.wait()
        self.received.update(buffers)
        for op, tensor in sending.items():
            self.sent(op, tensor)

    def sent(self, op: PipelineOp, tensor: torch.Tensor) -> None:
        """A message is on the far side: a forward's output keeps only its graph."""
        if op.kind == "F" and not self.forward_only:
            deallocate_output(tensor)

    def forward(self, op: PipelineOp) -> None:
        k = self.global_chunk(op)
        inputs, targets = self.micro_batches[op.microbatch]
        if k > 0:
            inputs = self.comm.arrived(self.received.pop(op))
            inputs.requires_grad_(not self.forward_only)
        with torch.set_grad_enabled(not self.forward_only):
            if k == self.last_chunk:
                loss = self.chunks[op.chunk](inputs, targets)
                self.loss_sum = self.loss_sum + loss.detach().float()
                output = loss * self.loss_scale / self.m
            else:
                output = self.chunks[op.chunk](inputs)
                check_outgoing(output, self.comm.shape, self.comm.dtype, self.pp_rank)
                self.outgoing[op] = output
        if not self.forward_only:
            self.in_flight[(op.microbatch, op.chunk)] = InFlight(inputs if k > 0 else None, output)

    def backward(self, op: PipelineOp) -> None:
        k = self.global_chunk(op)
        flight = self.in_flight.pop((op.microbatch, op.chunk))
        grad = None if k == self.last_chunk else self.comm.arrived(self.received.pop(op))
        torch.autograd.backward(flight.output, grad)
        if k > 0:
            self.outgoing[op] = flight.input.grad


def activation_shape(model_chunk: nn.Module, micro_batch: MicroBatch) -> tuple[int, int, int]:
    """[s, b, h] sent between stages, or the sequence shard [s/t, b, h] under SP."""
    batch, seq = micro_batch[0].shape
    tp = group_size(model_chunk.tp_group)
    if model_chunk.sequence_parallel:
        seq //= tp
    return (seq, batch, model_chunk.cfg.hidden_size)


def forward_backward_pipelining(model_chunks: Sequence[nn.Module],
                                micro_batches: Sequence[MicroBatch], grid: ParallelGrid, *,
                                schedule: str = "1f1b", forward_only: bool = False,
                                timeline: Timeline | None = None,
                                dtype: torch.dtype | None = None, step_type: type | None = None,
                                loss_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Run this rank's part of the pipeline schedule. Returns the sum of micro-batch losses as
    a tensor on the micro-batches' device (last stage; zero elsewhere). Gradients accumulate in
    the chunks' .grad (or a gradient buffer's buckets); a tied word embedding's plain .grad is
    summed over the first and last stage before returning (buckets: by finalize_grads)."""
    m, v = len(micro_batches), len(model_chunks)
    if dtype is None:  # activations travel in the parameters' dtype (bf16 under mixed precision)
        dtype = next(model_chunks[0].parameters()).dtype
    shape = activation_shape(model_chunks[0], micro_batches[0])
    device = micro_batches[0][0].device
    agree_on_schedule(grid, schedule, m, v, forward_only, shape, dtype, device)
    plan = checked_plans(schedule, grid.pp_size, m, v, forward_only)[grid.pp_rank]
    # Without SP the tp ranks hold the same activation: each sends 1/t (scatter_gather.py).
    scatter_gather = grid.tp_size > 1 and not model_chunks[0].sequence_parallel
    comm = (ScatterGatherP2P if scatter_gather else PipelineP2P)(grid, shape, dtype, device)
    loss_sum = (step_type or PipelineStep)(model_chunks, micro_batches, comm, plan, forward_only,
                                           timeline, loss_scale).run()  # or a layer's subclass
    if not forward_only:
        allreduce_embedding_grads(model_chunks, grid)
    return loss_sum
