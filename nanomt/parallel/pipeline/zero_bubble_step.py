"""The zero-bubble schedules' engine: the core engine's step with the backward split in two.

The core engine (engine.py) runs a pass of kind F as a forward and any other as the backward.
Under the zero-bubble schedules (zero_bubble.py: parallel.schedule=zb_h1 and zbv) the backward
comes in two kinds of pass:

  B(i, chunk)   the core backward, with the tensor-parallel linears' weight gradients left in
                weight_grad_store.STORE under the key (i, chunk): only dX = dY W runs now, and
                the input's gradient goes back to the previous stage as under 1F1B;
  W(i, chunk)   the weight gradients B(i, chunk) left, dW = dY^T X, accumulated into .grad.

For one step the chunks' linears defer their dW (weight_grad_store.deferring_weight_grads);
evaluation (forward_only) has no backward and runs the core step unchanged.

ZB-V's step also places its two chunks in a V (rank r holds chunks r and 2p-1-r,
partition.global_chunk_index): the last rank holds chunks p-1 and p, and what one of them would
send the other is handed over on the rank, as the message would arrive (`hand_over`).

ZB-V's plan posts every message at the end of the time step that made it
(posting.lockstep_plans), so waiting for each batch there would make every step as long as the
slower rank's pass. Instead a batch is posted and left in flight, and waited for only before
the first pass that takes one of its messages (`take`), with the batches before it to the same
peers (their sent outputs' data freed there); the rest by the end of the step. The posting
order is the plan's, so the ordering rule holds as replayed; waiting later than the replay's
model only removes waits, so a plan that the replay runs cannot hang.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanomt.parallel.pipeline.engine import PipelineStep
from nanomt.parallel.pipeline.p2p import P2PBatch
from nanomt.parallel.pipeline.posting import Transfer
from nanomt.parallel.pipeline.partition import global_chunk_index
from nanomt.parallel.pipeline.schedules import PipelineOp
from nanomt.parallel.pipeline.timeline import maybe_span
from nanomt.parallel.weight_grad_store import STORE, deferring_weight_grads


@dataclass
class InFlightBatch:
    """A posted batch not yet waited for: its peers, the passes its receives are for, and what
    it sends."""

    batch: P2PBatch
    peers: set[int]
    receives: set[PipelineOp]
    sending: dict[PipelineOp, torch.Tensor]


class ZeroBubbleStep(PipelineStep):
    """PipelineStep whose backward passes are B (input gradients) and W (weight gradients)."""

    def run(self) -> torch.Tensor:
        if self.forward_only:
            return super().run()
        with deferring_weight_grads(self.chunks):
            return super().run()

    def backward(self, op: PipelineOp) -> None:
        if op.kind == "W":
            STORE.run((op.microbatch, op.chunk))
            return
        with STORE.backward_of((op.microbatch, op.chunk)):  # where this B's dW work goes
            super().backward(op)


class ZeroBubbleVStep(ZeroBubbleStep):
    """ZeroBubbleStep over chunks placed in ZB-V's V (parallel.schedule=zbv), its batches
    waited for only where a pass takes their messages."""

    def run(self) -> torch.Tensor:
        self.posted: list[InFlightBatch] = []
        loss_sum = super().run()
        while self.posted:  # the last sends: done before the step ends
            self.wait_for(self.posted[0])
        return loss_sum

    def exchange(self, transfers: tuple[Transfer, ...]) -> None:
        """Post one batch in plan order and leave it in flight."""
        sending = {t.op: self.outgoing.pop(t.op) for t in transfers if t.is_send}
        batch, buffers = self.comm.post(transfers, sending)
        self.received.update(buffers)  # filled once the batch is waited for (take)
        self.posted.append(InFlightBatch(batch, {t.peer for t in transfers}, set(buffers),
                                         sending))

    def take(self, op: PipelineOp) -> None:
        """Before pass `op`: wait for the batch holding its message, if any, and for the
        batches posted before it with the same peers, which those peers have posted too (the
        ordering rule), so they cost no further wait; their sent outputs' data is freed there
        (gloo reports a send done only once waited for)."""
        taken = next((i for i, p in enumerate(self.posted) if op in p.receives), None)
        if taken is not None:
            peers = self.posted[taken].peers
            for posted in [p for p in self.posted[:taken + 1] if p.peers <= peers]:
                self.wait_for(posted)

    def wait_for(self, posted: InFlightBatch) -> None:
        with maybe_span(self.timeline, "wait"):
            posted.batch.wait()
        self.posted.remove(posted)
        for op, tensor in posted.sending.items():
            self.sent(op, tensor)

    def global_chunk(self, op: PipelineOp) -> int:
        return global_chunk_index(op.chunk, self.pp_rank, self.pp, v_shape=True)

    def run_pass(self, op: PipelineOp) -> None:
        self.take(op)  # outside the pass's span: the timeline counts the wait as idle
        super().run_pass(op)

    def forward(self, op: PipelineOp) -> None:
        super().forward(op)
        if self.global_chunk(op) == self.pp - 1:  # the V turns: chunk p is this rank's chunk 1
            self.hand_over(op, PipelineOp("F", op.microbatch, 1))

    def backward(self, op: PipelineOp) -> None:
        super().backward(op)
        if op.kind == "B" and self.global_chunk(op) == self.pp:
            self.hand_over(op, PipelineOp("B", op.microbatch, 0))

    def hand_over(self, sender: PipelineOp, taker: PipelineOp) -> None:
        """What `sender` would send, received by `taker` on this rank as a message arrives: a
        new leaf (its own graph starts there), not the sender's tensor."""
        self.received[taker] = self.comm.to_wire(self.outgoing.pop(sender).detach())
