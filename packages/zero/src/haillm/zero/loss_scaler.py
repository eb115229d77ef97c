"""Dynamic loss scaling for fp16 training (Micikevicius et al., 2018, "Mixed Precision Training").

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero. Multiplying the loss by a large
scale S shifts every gradient up by S, into fp16's range; the optimizer divides by S again (in
fp32) before the update. S is chosen dynamically:

* a step whose gradients contain inf/nan (on ANY rank) is skipped and S is multiplied by
  `backoff_factor` (0.5): the scale was too large;
* after `growth_interval` consecutive clean steps S is multiplied by `growth_factor` (2): try a
  larger scale, to use as much of fp16's range as possible.

bf16 has fp32's 8 exponent bits and needs no loss scaling.
"""

from __future__ import annotations

import torch

__all__ = ["DynamicLossScaler"]


class DynamicLossScaler:
    """Holds the loss scale S and updates it from the found-inf flag of each step.

    Args:
        init_scale: the first S.
        growth_factor: S is multiplied by this after `growth_interval` clean steps (> 1).
        backoff_factor: S is multiplied by this after a step with inf/nan gradients (in (0, 1)).
        growth_interval: number of consecutive clean steps before growing S (≥ 1).
        min_scale: S never goes below this.
        max_scale: S never goes above this.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, *,
                 min_scale: float = 1.0, max_scale: float = 2.0**24):
        if init_scale <= 0:
            raise ValueError(f"init_scale ({init_scale}) must be > 0")
        if growth_factor <= 1.0:
            raise ValueError(f"growth_factor ({growth_factor}) must be > 1")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor ({backoff_factor}) must be in (0, 1)")
        if growth_interval < 1:
            raise ValueError(f"growth_interval ({growth_interval}) must be >= 1")
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.clean_steps = 0  # consecutive steps without inf/nan since the last change

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * S``: call ``.backward()`` on this instead of on the loss."""
        return loss * self.scale

    @property
    def inv_scale(self) -> float:
        """1 / S: what the optimizer multiplies the fp32 gradients by."""
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        """Back off after an overflow, grow after `growth_interval` clean steps.

        `found_inf` must already be agreed on by every rank (all-reduced), so that all ranks
        keep the same S.
        """
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale = min(self.scale * self.growth_factor, self.max_scale)
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])

    def __repr__(self) -> str:
        return (f"DynamicLossScaler(scale={self.scale:g}, clean_steps={self.clean_steps}/"
                f"{self.growth_interval})")
