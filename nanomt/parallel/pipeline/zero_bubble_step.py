"""The zero-bubble schedules' engine: the core engine's step with the backward split in two.

The core engine (engine.py) runs a pass of kind F as a forward and any other as the backward.
Under the zero-bubble schedules (zero_bubble.py: parallel.schedule=zb_h1) the backward comes in
two kinds of pass:

  B(i, chunk)   the core backward, with the tensor-parallel linears' weight gradients left in
                weight_grad_store.STORE under the key (i, chunk): only dX = dY W runs now, and
                the input's gradient goes back to the previous stage as under 1F1B;
  W(i, chunk)   the weight gradients B(i, chunk) left, dW = dY^T X, accumulated into .grad.

For one step the chunks' linears defer their dW (weight_grad_store.deferring_weight_grads);
evaluation (forward_only) has no backward and runs the core step unchanged.
"""

from __future__ import annotations

import torch

from nanomt.parallel.pipeline.engine import PipelineStep
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
