"""Partition a model into pipeline stages: profile its pieces, then cut where they balance.

plan = plan_stages(model, num_stages=2, sample_batch=tokens, microbatches=4)
print(plan.describe())   # what `shardwise train --pp 2 --dry-run` shows
"""

from __future__ import annotations

from shardwise.partition.cut import (
    Plan,
    StagePlan,
    balance,
    plan_stages,
    profiled_cuts,
    shared_plan,
)
from shardwise.partition.profile import PieceCost, profile_pieces

__all__ = [
    "PieceCost",
    "Plan",
    "StagePlan",
    "balance",
    "plan_stages",
    "profile_pieces",
    "profiled_cuts",
    "shared_plan",
]
