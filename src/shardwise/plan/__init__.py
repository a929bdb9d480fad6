"""Planning a layout: profile a model's pieces, then cut it into balanced pipeline stages.

plan = plan_stages(model, num_stages=2, sample_batch=tokens, microbatches=4)
print(plan.describe())   # what `shardwise train --pp 2 --dry-run` shows
"""

from __future__ import annotations

from shardwise.plan.partition import Plan, StagePlan, balance, plan_stages, shared_plan
from shardwise.plan.profile import PieceCost, profile_pieces

__all__ = [
    "PieceCost",
    "Plan",
    "StagePlan",
    "balance",
    "plan_stages",
    "profile_pieces",
    "shared_plan",
]
