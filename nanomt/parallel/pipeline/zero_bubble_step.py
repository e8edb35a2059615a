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
"""

from __future__ import annotations

import torch

from nanomt.parallel.pipeline.engine import PipelineStep
from nanomt.parallel.pipeline.partition import global_chunk_index
from nanomt.parallel.pipeline.schedules import PipelineOp
from nanomt.parallel.weight_grad_store import STORE, deferring_weight_grads


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
    """ZeroBubbleStep over chunks placed in ZB-V's V (parallel.schedule=zbv)."""

    def global_chunk(self, op: PipelineOp) -> int:
        return global_chunk_index(op.chunk, self.pp_rank, self.pp, v_shape=True)

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
