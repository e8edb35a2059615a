"""Dynamic loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed Precision Training").

fp16 has 5 exponent bits: small gradients underflow to zero. Multiplying the loss by a scale S
multiplies every gradient by S (backward is linear), lifting them into range: the schedule
starts each backward from S * loss / m (its loss_scale argument); the optimizer divides by S
again before the update. S is chosen dynamically:

    a step whose gradients hold inf/nan  -> skip the update, S <- max(S / 2, min_scale)
    growth_interval clean steps in a row -> S <- 2 S

The rule runs on the device, from the device's inf/nan verdict (ShardedAdamW.clip_grads), with
torch.where: deciding the scale adds no host sync of its own (the step's one read brings S
along, nanomt.step_read.read_step), and the schedule multiplies the loss by S without a
host-to-device copy. S is kept in float64: halving and doubling it are exact, so it is the same
number, bit for bit, as the host's float rule would give (for any initial and min); the schedule
multiplies the fp32 loss by S cast to fp32.

If overflows persist with S already at min_scale (a NaN that no scale removes, or a min_scale
too high for this model), skipping forever would train nothing: after `max_overflows_at_min`
such steps in a row the scaler marks the update, on the device, and `check` raises at the
step's host read, naming the step and train.loss_scale.min.

Every rank of every group must take the same decision (or the replicas diverge): the verdict
is the inf/nan count summed over the whole world (nanomt.optim.grad_norm).
"""

from __future__ import annotations

import torch


class DynamicLossScaler:
    """The loss scale S and its update rule, on the device (module docstring)."""

    def __init__(self, initial_scale: float = 2.0**16, growth_interval: int = 1000,
                 min_scale: float = 1.0, max_overflows_at_min: int = 10,
                 device: torch.device | str = "cpu"):
        self.growth_interval = growth_interval
        self.min_scale = float(min_scale)
        self.max_overflows_at_min = max_overflows_at_min
        self.updates = 0  # update() calls so far (host count: no read)
        self.scale = torch.tensor(float(initial_scale), dtype=torch.float64, device=device)
        self.clean_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.overflows_at_min = torch.zeros_like(self.clean_steps)  # in a row, S at its min
        self.failed_at = torch.zeros_like(self.clean_steps)  # the update that hit the limit

    def to(self, device: torch.device | str) -> DynamicLossScaler:
        """Move the state onto `device` (the optimizer's); returns self."""
        for name in ("scale", "clean_steps", "overflows_at_min", "failed_at"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def update(self, overflow: torch.Tensor | bool) -> None:
        """One step's verdict (True: some gradient held inf/nan) -> the next step's S. Launches
        a few scalar kernels; reads nothing."""
        overflow = torch.as_tensor(overflow, device=self.scale.device)
        self.updates += 1
        at_min = overflow & (self.scale <= self.min_scale)
        self.overflows_at_min = torch.where(at_min, self.overflows_at_min + 1, 0)
        first = (self.overflows_at_min >= self.max_overflows_at_min) & (self.failed_at == 0)
        self.failed_at = torch.where(first, self.updates, self.failed_at)
        self.clean_steps = torch.where(overflow, 0, self.clean_steps + 1)
        grow = ~overflow & (self.clean_steps % self.growth_interval == 0)
        self.scale = torch.where(overflow, torch.clamp(self.scale / 2, min=self.min_scale),
                                 torch.where(grow, self.scale * 2, self.scale))

    def unscale_factor(self) -> torch.Tensor:
        """1 / S rounded to fp32, the gradients' dtype (a device scalar)."""
        return (1.0 / self.scale).float()

    def check(self, failed_at: int, step: int) -> None:
        """Raise if `failed_at` (a host read of self.failed_at, made every step; 0: none)
        names an update: then it is step `step`'s."""
        if not failed_at:
            return
        raise FloatingPointError(
            f"step {step}: {self.max_overflows_at_min} steps in a row had inf/nan gradients with the "
            f"loss scale at its minimum ({self.min_scale}): the gradients are not finite at "
            f"any scale. Lower train.loss_scale.min, or look for a NaN in the model/data")

    def state_dict(self) -> dict:
        """{"scale": float, "clean_steps": int}: a host read (a checkpoint's save)."""
        return {"scale": float(self.scale), "clean_steps": int(self.clean_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(float(state["scale"]))
        self.clean_steps.fill_(int(state["clean_steps"]))
