"""Dynamic loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed Precision Training").

fp16 has 5 exponent bits: small gradients underflow to zero. Multiplying the loss by a scale S
multiplies every gradient by S (backward is linear), lifting them into range: the schedule
starts each backward from S * loss / m (its loss_scale argument); the optimizer divides by S
again before the update. S is chosen dynamically:

    a step whose gradients hold inf/nan  -> skip the update, S <- max(S / 2, min_scale)
    growth_interval clean steps in a row -> S <- 2 S

If overflows persist with S already at min_scale (a NaN that no scale removes, or a min_scale
too high for this model), skipping forever would train nothing: after `max_overflows_at_min`
such steps in a row the scaler raises, naming train.loss_scale.min.

Every rank of every group must take the same decision (or the replicas diverge), so the
overflow flag is summed over the whole world before anyone looks at it (see ShardedAdamW.step).
"""

from __future__ import annotations


class DynamicLossScaler:
    """The loss scale S and its update rule (module docstring)."""

    def __init__(self, initial_scale: float = 2.0**16, growth_interval: int = 1000,
                 min_scale: float = 1.0, max_overflows_at_min: int = 10):
        if initial_scale <= 0 or min_scale <= 0 or growth_interval < 1:
            raise ValueError("train.loss_scale: initial and min must be > 0, "
                             "growth_interval >= 1")
        self.scale = float(initial_scale)
        self.growth_interval = growth_interval
        self.min_scale = float(min_scale)
        self.clean_steps = 0
        self.max_overflows_at_min = max_overflows_at_min
        self.overflows_at_min = 0  # consecutive overflowing steps with the scale at its minimum

    def update(self, found_overflow: bool) -> None:
        if found_overflow:
            self.overflows_at_min = self.overflows_at_min + 1 if self.scale <= self.min_scale else 0
            if self.overflows_at_min >= self.max_overflows_at_min:
                raise FloatingPointError(
                    f"{self.overflows_at_min} steps in a row had inf/nan gradients with the loss "
                    f"scale at its minimum ({self.min_scale}): the gradients are not finite at "
                    f"any scale. Lower train.loss_scale.min, or look for a NaN in the model/data")
            self.scale = max(self.scale / 2, self.min_scale)
            self.clean_steps = 0
            return
        self.overflows_at_min = 0
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0:
            self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
