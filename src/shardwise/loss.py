"""The loss every layout computes: summed token cross-entropy, divided by the step's tokens.

    loss = token_loss_sum(model(tokens), targets) / step_tokens

Summing here and dividing once by the token count of the whole optimizer step (over every rank
and micro-step) makes the gradient exactly that of the global token-mean loss, whatever the
split over replicas, micro-steps, pipeline micro-batches and padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Targets that count for nothing: padding, and positions a user masks out.
IGNORE_INDEX = -100


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the targets that are not IGNORE_INDEX (in float32).

    loss = token_loss_sum(model(tokens), targets) / step_tokens
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_targets(targets: torch.Tensor) -> int:
    """How many targets count toward the loss (not IGNORE_INDEX).

    >>> count_targets(torch.tensor([[1, -100], [2, 3]]))
    3
    """
    return int((targets != IGNORE_INDEX).sum())
