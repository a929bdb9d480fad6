"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

scheduler = warmup_cosine(optimizer, warmup_steps=20, total_steps=300, min_ratio=0.1)
scheduler.step()  # once per optimizer step
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier on the peak LR at `step` (0-based count of optimizer steps taken)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
) -> LambdaLR:
    """A LambdaLR following `lr_factor`; its state is just the step count, so resume is exact."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_ratio))


def follow_lr_schedule(optimizer: Optimizer, scheduler: LambdaLR, factor: float) -> None:
    """Set each group's rate to its base rate times `factor` (this run's schedule at a step).

    follow_lr_schedule(optimizer, scheduler, lr_factor(step, 20, 400, 0.1))   # after a resume

    A resumed run takes the next rate from its own schedule: `max_steps` may have changed.
    """
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * factor
