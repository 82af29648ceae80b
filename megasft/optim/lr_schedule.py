"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

The seed's formula, with peak η, warmup Tw, total T and floor ratio r (``min_lr_ratio``):

    lr(t) = η · (t + 1) / Tw                                  for t < Tw
    lr(t) = η · [r + (1 − r) · ½ · (1 + cos(π · progress))]   otherwise,
            progress = (t − Tw) / (T − Tw), clamped to [0, 1]

t counts applied optimizer steps from 0. Worked example (T=10, Tw=2, η=2e-5, r=0.1):
t=0 → 1.0e-5, t=1 → 2.0e-5, t=2 → 2.0e-5, t=3 → 1.93e-5, t=5 → 1.44e-5, t=9 → 2.69e-6.
The warmup ends at the peak (t = Tw − 1 gives η) so the cosine starts where the warmup stops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megasft.config import OptimConfig


def warmup_cosine_lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int,
                     min_lr_ratio: float) -> float:
    """The learning rate for optimizer step `step` (0-based) under the formula above."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    # Past the end (or with no decay phase at all) the schedule rests on the floor.
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


@dataclass(frozen=True)
class WarmupCosine:
    """The schedule as a callable ``step -> lr``, the form DistributedOptimizer takes."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    @classmethod
    def from_config(cls, optim: OptimConfig, total_steps: int) -> "WarmupCosine":
        return cls(optim.lr, optim.warmup(total_steps), total_steps, optim.min_lr_ratio)

    def __call__(self, step: int) -> float:
        return warmup_cosine_lr(step, self.peak_lr, self.warmup_steps, self.total_steps,
                                self.min_lr_ratio)

    def multiplier(self, step: int) -> float:
        """lr(step) / peak: the factor torch.optim.lr_scheduler.LambdaLR expects from its lambda."""
        return self(step) / self.peak_lr
