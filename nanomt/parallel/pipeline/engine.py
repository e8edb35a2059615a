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

Between passes, the send of what the pass produced and the receive the next pass needs go out
together (p2p.PipelineComm.exchange). Gradients accumulate in .grad over all micro-batches, and
the tied word embedding's two copies (first and last stage) sum theirs at the end, so after the
schedule they equal the single-process gradient of the mean loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from nanomt.parallel.comm import group_size
from nanomt.parallel.pipeline.p2p import (
    ACTIVATION,
    GRADIENT,
    Message,
    PipelineComm,
    agree_on_schedule,
    dtype_code,
    message_tag,
)
from nanomt.parallel.pipeline.partition import allreduce_embedding_grads
from nanomt.parallel.pipeline.schedules import SCHEDULES, PipelineOp, checked_schedule
from nanomt.parallel.pipeline.timeline import Timeline, maybe_span

MicroBatch = tuple[torch.Tensor, torch.Tensor]


def deallocate_output(output: torch.Tensor) -> None:
    """Free the data of a sent output; its grad_fn (the graph) stays for the backward."""
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
                 comm: PipelineComm, order: Sequence[PipelineOp], forward_only: bool,
                 timeline: Timeline | None, stats: PipelineStats):
        self.chunks, self.micro_batches = model_chunks, micro_batches
        self.comm, self.order = comm, order
        self.forward_only, self.timeline, self.stats = forward_only, timeline, stats
        grid = comm.grid
        self.pp, self.pp_rank = grid.pp_size, grid.pp_rank
        self.m = len(micro_batches)
        self.last_chunk = self.pp * len(model_chunks) - 1
        self.in_flight: dict[tuple[int, int], InFlight] = {}
        self.unfreed: list[tuple[object, torch.Tensor | None]] = []  # (send work, output to free)
        self.loss_sum = torch.zeros(())

    def global_chunk(self, op: PipelineOp) -> int:
        return op.chunk * self.pp + self.pp_rank

    def message_for(self, op: PipelineOp | None) -> Message | None:
        """The receive `op` needs: the previous chunk's activation or the next chunk's gradient."""
        if op is None:
            return None
        k = self.global_chunk(op)
        if op.kind == "F" and k > 0:
            return Message(self.comm.prev_rank, message_tag(ACTIVATION, k, op.microbatch, self.m))
        if op.kind == "B" and k < self.last_chunk:
            return Message(self.comm.next_rank, message_tag(GRADIENT, k, op.microbatch, self.m))
        return None

    def run(self) -> torch.Tensor:
        buffer, receive, _ = self.comm.exchange([], self.message_for(self.order[0]))
        for index, op in enumerate(self.order):
            if receive is not None:
                with maybe_span(self.timeline, "wait", op.microbatch, op.chunk):
                    receive.wait()
            self.stats.op_order.append(str(op))
            with maybe_span(self.timeline, op.kind, op.microbatch, op.chunk):
                sends = self.forward(op, buffer) if op.kind == "F" else self.backward(op, buffer)
            next_op = self.order[index + 1] if index + 1 < len(self.order) else None
            buffer, receive, works = self.comm.exchange(
                [(tensor, msg) for tensor, msg, _ in sends], self.message_for(next_op))
            self.unfreed += [(work, to_free) for work, (_, _, to_free) in zip(works, sends)]
            self.free_sent_outputs(wait=False)
        self.free_sent_outputs(wait=True)
        return self.loss_sum

    def forward(self, op: PipelineOp, received: torch.Tensor | None) -> list:
        k = self.global_chunk(op)
        inputs, targets = self.micro_batches[op.microbatch]
        if k > 0:
            inputs = received.requires_grad_(not self.forward_only)
        with torch.set_grad_enabled(not self.forward_only):
            if k == self.last_chunk:
                loss = self.chunks[op.chunk](inputs, targets)
                self.loss_sum = self.loss_sum + loss.detach().float().cpu()
                output = loss / self.m
            else:
                output = self.chunks[op.chunk](inputs)
        if not self.forward_only:
            self.in_flight[(op.microbatch, op.chunk)] = InFlight(inputs if k > 0 else None, output)
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, len(self.in_flight))
        if k == self.last_chunk:
            return []
        self.comm.check_outgoing(output)
        self.stats.outputs_sent += 1
        msg = Message(self.comm.next_rank, message_tag(ACTIVATION, k + 1, op.microbatch, self.m))
        return [(output.detach(), msg, output)]

    def backward(self, op: PipelineOp, received: torch.Tensor | None) -> list:
        k = self.global_chunk(op)
        flight = self.in_flight.pop((op.microbatch, op.chunk))
        if k == self.last_chunk:
            torch.autograd.backward(flight.output)
        else:
            self.free_sent_outputs(wait=True, only=flight.output)
            backward_from(flight.output, received)
        if k == 0:
            return []
        msg = Message(self.comm.prev_rank, message_tag(GRADIENT, k - 1, op.microbatch, self.m))
        return [(flight.input.grad, msg, None)]

    def free_sent_outputs(self, wait: bool, only: torch.Tensor | None = None) -> None:
        """Free the data of outputs whose send has completed (all, or `only`, when wait=True)."""
        held = 0
        still_unfreed = []
        for work, output in self.unfreed:
            selected = only is None or output is only
            if (wait and selected) or work.is_completed():
                work.wait()
                if output is not None:
                    deallocate_output(output)
                    self.stats.outputs_freed += 1
            else:
                still_unfreed.append((work, output))
                held += output.numel() * output.element_size() if output is not None else 0
        self.unfreed = still_unfreed
        self.stats.peak_unfreed_output_bytes = max(self.stats.peak_unfreed_output_bytes, held)


def activation_shape(model_chunk: nn.Module, micro_batch: MicroBatch) -> tuple[int, int, int]:
    """[b, s, h] sent between stages, or the sequence shard [b, s/t, h] under SP."""
    batch, seq = micro_batch[0].shape
    tp = group_size(model_chunk.tp_group)
    if model_chunk.sequence_parallel:
        seq //= tp
    return (batch, seq, model_chunk.cfg.hidden_size)


def forward_backward_pipelining(model_chunks: Sequence[nn.Module],
                                micro_batches: Sequence[MicroBatch], grid, *,
                                schedule: str = "1f1b", forward_only: bool = False,
                                timeline: Timeline | None = None,
                                stats: PipelineStats | None = None,
                                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run this rank's part of the pipeline schedule. Returns the sum of micro-batch losses
    (last stage; zero elsewhere). Gradients accumulate in the chunks' .grad; the tied word
    embedding's gradient is summed over the first and last stage before returning."""
    m, v = len(micro_batches), len(model_chunks)
    if dtype is None:  # activations travel in the parameters' dtype (bf16 under mixed precision)
        dtype = next(model_chunks[0].parameters()).dtype
    shape = activation_shape(model_chunks[0], micro_batches[0])
    agree_on_schedule(grid, {"schedule": SCHEDULES.index(schedule), "microbatches": m,
                             "virtual_stages": v, "forward_only": forward_only,
                             "batch": shape[0], "seq": shape[1], "hidden": shape[2],
                             "dtype": dtype_code(dtype)})
    order = checked_schedule(schedule, grid.pp_size, m, v, forward_only)[grid.pp_rank]
    device = micro_batches[0][0].device
    comm = PipelineComm(grid, shape, dtype, device)
    step = PipelineStep(model_chunks, micro_batches, comm, order, forward_only, timeline,
                        stats if stats is not None else PipelineStats())
    loss_sum = step.run()
    if not forward_only:
        allreduce_embedding_grads(model_chunks, grid)
    return loss_sum
