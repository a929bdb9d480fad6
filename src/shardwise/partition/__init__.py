"""Partition a model into pipeline stages: profile its pieces, then cut where they balance.

plan = cut_stages(model, num_stages=2, sample_batch=tokens, microbatches=4)
print(plan.describe())   # what `shardwise train --pp 2 --dry-run` shows
"""

from __future__ import annotations

from shardwise.partition.cut import (
    CutStage,
    PipelineCut,
    balance,
    cut_stages,
    profiled_cuts,
    shared_cut,
)
from shardwise.partition.profile import PieceCost, profile_pieces

__all__ = [
    "CutStage",
    "PieceCost",
    "PipelineCut",
    "balance",
    "cut_stages",
    "profile_pieces",
    "profiled_cuts",
    "shared_cut",
]
