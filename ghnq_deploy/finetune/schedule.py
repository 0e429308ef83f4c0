"""One-cycle learning rate for short budgets (Smith & Topin 2019), as a pure function of the step.

A pure function (no scheduler state) so a resumed run computes exactly the rate the
uninterrupted one would, and a ``--minutes`` run can fix its length after a few timed steps:
``start`` steps run at the initial rate, then the cycle spans the rest of ``total``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OneCycle:
    max_lr: float
    total: int
    warmup: float = 0.15  # fraction of the cycle spent rising
    div_factor: float = 25.0  # initial rate = max_lr / div_factor
    final_div: float = 1e4  # final rate = initial / final_div
    start: int = 0  # steps before the cycle (a --minutes run's timing probe) at the initial rate

    def lr(self, step: int) -> float:
        """Rate of step ``step`` (0-based): linear rise, then cosine fall to the final rate."""
        initial = self.max_lr / self.div_factor
        if step < self.start:
            return initial
        length = max(1, self.total - self.start)
        t = min(step - self.start, length - 1)
        rise = max(1, round(self.warmup * length))
        if t < rise:
            return initial + (self.max_lr - initial) * t / rise
        fall = max(1, length - 1 - rise)
        final = initial / self.final_div
        return final + (self.max_lr - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - rise) / fall)))
