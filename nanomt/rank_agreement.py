"""Decisions every rank must take alike, checked inside the step's one all-reduce.

Whether to skip the update (an inf/nan gradient), whether the step counts as non-finite, and
fp16's next loss scale are decided on every rank from values that should be equal everywhere.
If a bug made ranks differ, their next collectives would differ: a crash on gloo, a hang on
NCCL. So each decision d travels in the step's MAX all-reduce as (d, -d): the largest and the
smallest over the ranks, which must be equal, or every rank raises RanksDisagree naming it.
The preemption flag needs no check (it is the maximum by design); checkpoint verdicts are
broadcast (nanomt.checkpoint).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanomt.errors import RanksDisagree

if TYPE_CHECKING:
    from nanomt.optim.loss_scaler import DynamicLossScaler

DECISIONS = ("skip the update (inf/nan gradient)", "count a non-finite step (loss or norm)")


def collective_decisions(totals: torch.Tensor, loss: torch.Tensor,
                         scaler: DynamicLossScaler | None) -> torch.Tensor:
    """This rank's DECISIONS (and fp16's next loss scale) as a float64 tensor on the device."""
    skip = ~torch.isfinite(totals).all()
    values = [skip, skip | ~torch.isfinite(loss.reshape(()))]
    if scaler is not None:
        values.append(scaler.scale)
    return torch.stack([v.double() for v in values])


def check_agreement(step: int, largest: list[float], smallest: list[float]) -> None:
    """Raise RanksDisagree naming each decision whose largest and smallest value differ."""
    names = DECISIONS + ("the next fp16 loss scale",)
    split = [f"{name}: from {lo:g} to {hi:g}"
             for name, hi, lo in zip(names, largest, smallest) if hi != lo]
    if split:
        raise RanksDisagree(f"step {step}: the ranks disagree on " + "; ".join(split)
                            + " (a decision that must be collective: a bug in nanomt)")
