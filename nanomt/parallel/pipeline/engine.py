"""Running a pipeline schedule: one rank's forward and backward passes and the messages between.

The schedule (schedules.py) says in which order this rank runs its passes; this module runs them:

  forward  F(i, chunk):  input = tokens (first chunk) or the activation received from the
           previous chunk; output = chunk(input); the last chunk computes the loss, scaled by 1/m
           as in plain gradient accumulation. The output is sent on, and once the send is done its
           data is freed: only its grad_fn, and the tensors that saves, wait for the backward
           (Megatron's deallocate_output_tensor), so holding k micro-batches costs k micro-batches
           of saved activations and no more.
  backward B(i, chunk):  backward from the output with the gradient received from the next chunk
           (or from the loss on the last chunk); the input's gradient is sent back.

Messages go out in the units of posting.communication_plan, checked against NCCL's posting
rules (docs/pipeline.md, "Messages"): activations on one queue, gradients on another, each
receive posted a pass ahead. Before a pass the rank waits only for the units holding its
receives (with the units before them on their queues; the rest stay in flight, overlapping its
compute), then frees the outputs the completed units sent. Without
sequence parallelism each tp rank sends 1/t of a message and the receiver all-gathers it over tp
when the pass takes its input (p2p.py). Gradients accumulate in .grad
over all micro-batches, and the tied word embedding's two copies (first and last stage) sum
theirs at the end, so after the schedule they equal the single-process gradient of the mean loss.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from nanomt.parallel.comm import group_size
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.pipeline.p2p import P2PBatch, PipelineComm, agree_on_schedule, dtype_code
from nanomt.parallel.pipeline.partition import allreduce_embedding_grads
from nanomt.parallel.pipeline.posting import Unit, checked_plans
from nanomt.parallel.pipeline.schedules import SCHEDULES, PipelineOp
from nanomt.parallel.pipeline.timeline import Timeline, maybe_span

MicroBatch = tuple[torch.Tensor, torch.Tensor]


def deallocate_output(output: torch.Tensor) -> None:
    """Free the data of a sent output; its grad_fn (the graph) stays for the backward.
    A view would keep its base's storage alive, so only a tensor that owns its data is freed."""
    assert output._base is None, "deallocate_output needs a tensor that owns its storage"
    output.data = torch.empty((1,), device=output.device, dtype=output.dtype)


def backward_from(output: torch.Tensor, grad: torch.Tensor) -> None:
    """output.backward(grad) for an output whose data was freed.

    torch.autograd.backward checks grad's shape against output's (now a single element), so go
    to the autograd engine directly, as Megatron's custom_backward does.
    """
    torch.autograd.Variable._execution_engine.run_backward(
        (output,), (grad,), False, False, (), True, True)


@dataclass
class InFlight:
    """A micro-batch's pass through one chunk, between its forward and its backward."""

    input: torch.Tensor | None  # the received activation (None on the first chunk)
    output: torch.Tensor  # chunk output (data freed once sent) or the scaled loss (last chunk)


@dataclass
class PipelineStats:
    """What a step held: the most micro-batch passes in flight at once, and output bytes kept."""

    peak_in_flight: int = 0
    peak_unfreed_output_bytes: int = 0
    outputs_sent: int = 0
    outputs_freed: int = 0
    op_order: list[str] = field(default_factory=list)


class PipelineStep:
    """One rank's passes of one optimizer step (or evaluation, forward_only)."""

    def __init__(self, model_chunks: Sequence[nn.Module], micro_batches: Sequence[MicroBatch],
                 comm: PipelineComm, plan: Sequence[Unit], forward_only: bool,
                 timeline: Timeline | None, stats: PipelineStats,
                 loss_scale: float | torch.Tensor = 1.0):
        self.chunks, self.micro_batches = model_chunks, micro_batches
        self.comm, self.plan = comm, plan
        self.forward_only, self.timeline, self.stats = forward_only, timeline, stats
        grid = comm.grid
        self.pp, self.pp_rank = grid.pp_size, grid.pp_rank
        self.m = len(micro_batches)
        self.loss_scale = loss_scale  # fp16: backward starts from S * loss / m
        self.last_chunk = self.pp * len(model_chunks) - 1
        self.in_flight: dict[tuple[int, int], InFlight] = {}
        self.received: dict[PipelineOp, torch.Tensor] = {}  # receive buffers, by the pass
        self.outgoing: dict[PipelineOp, torch.Tensor] = {}  # what a pass sends, until posted
        self.to_free: dict[PipelineOp, torch.Tensor] = {}  # outputs to free once sent
        # per queue, posted units not yet waited for: (index in the plan, handle, outputs sent)
        self.pending: tuple[deque[tuple[int, P2PBatch, list[torch.Tensor]]], ...] = (
            deque(), deque())
        self.loss_sum = torch.zeros((), device=micro_batches[0][0].device)

    def global_chunk(self, op: PipelineOp) -> int:
        return op.chunk * self.pp + self.pp_rank

    def run(self) -> torch.Tensor:
        for index, unit in enumerate(self.plan):
            waits = unit.wait_for if unit.wait_for is not None else range(index)
            self.wait_for(waits, unit.passes[0] if unit.passes else None)
            for op in unit.passes:
                self.stats.op_order.append(str(op))
                with maybe_span(self.timeline, op.kind, op.microbatch, op.chunk):
                    self.forward(op) if op.kind == "F" else self.backward(op)
            self.post(index, unit)
        self.wait_for(range(len(self.plan)), None)
        return self.loss_sum

    def wait_for(self, units: Sequence[int], op: PipelineOp | None) -> None:
        """Wait for the posted `units` and those before them on their queues (in posting order,
        as they complete), then free the outputs they sent; later units stay in flight."""
        first = op if op is not None else PipelineOp("wait", -1, -1)
        upto: dict[int, int] = {}  # per queue, the last unit to wait for
        for u in units:
            upto[self.plan[u].queue] = max(upto.get(self.plan[u].queue, -1), u)
        for queue, last in upto.items():
            pending = self.pending[queue]
            while pending and pending[0][0] <= last:
                _, batch, sent = pending.popleft()
                with maybe_span(self.timeline, "wait", first.microbatch, first.chunk):
                    batch.wait()
                for output in sent:  # its data is on the wire's far side: keep only the graph
                    deallocate_output(output)
                    self.stats.outputs_freed += 1

    def post(self, index: int, unit: Unit) -> None:
        """Post the unit's sends (what its passes produced) and receives together on its queue."""
        transfers = [(t, self.outgoing.pop(t.op) if t.is_send else None)
                     for t in unit.transfers]
        batch, buffers = self.comm.post(transfers, unit.queue)
        self.received.update(buffers)
        sent = [self.to_free.pop(t.op) for t in unit.transfers
                if t.is_send and t.op in self.to_free]
        if batch is None:  # nothing posted: the outputs (none were sent) need no wait
            assert not sent
            return
        self.pending[unit.queue].append((index, batch, sent))
        held = sum(out.numel() * out.element_size()
                   for queue in self.pending for _, _, outputs in queue for out in outputs)
        self.stats.peak_unfreed_output_bytes = max(self.stats.peak_unfreed_output_bytes, held)

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
        if not self.forward_only:
            self.in_flight[(op.microbatch, op.chunk)] = InFlight(inputs if k > 0 else None, output)
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, len(self.in_flight))
        if k == self.last_chunk:
            return
        self.comm.check_outgoing(output)
        self.stats.outputs_sent += 1
        self.outgoing[op] = output.detach()
        if not self.forward_only:
            self.to_free[op] = output

    def backward(self, op: PipelineOp) -> None:
        k = self.global_chunk(op)
        flight = self.in_flight.pop((op.microbatch, op.chunk))
        if k == self.last_chunk:
            torch.autograd.backward(flight.output)
        else:
            backward_from(flight.output, self.comm.arrived(self.received.pop(op)))
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
                                stats: PipelineStats | None = None,
                                dtype: torch.dtype | None = None,
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
    agree_on_schedule(grid, {"schedule": SCHEDULES.index(schedule), "microbatches": m,
                             "virtual_stages": v, "forward_only": forward_only,
                             "seq": shape[0], "batch": shape[1], "hidden": shape[2],
                             "dtype": dtype_code(dtype)}, device)
    plan = checked_plans(schedule, grid.pp_size, m, v, forward_only)[grid.pp_rank]
    # Without SP the tp ranks hold the same activation: each sends 1/t of it (p2p.py).
    scatter_gather = not model_chunks[0].sequence_parallel
    comm = PipelineComm(grid, shape, dtype, device, scatter_gather)
    step = PipelineStep(model_chunks, micro_batches, comm, plan, forward_only, timeline,
                        stats if stats is not None else PipelineStats(), loss_scale)
    loss_sum = step.run()
    if not forward_only:
        allreduce_embedding_grads(model_chunks, grid)
    return loss_sum
