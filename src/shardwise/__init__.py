"""shardwise: train PyTorch sequence models across devices and processes.

import shardwise
session = shardwise.setup()          # your own loop: see README, five changed lines
"""

from __future__ import annotations

from shardwise.config import TrainConfig
from shardwise.errors import ShardwiseError
from shardwise.session import Session, setup


def run(config: TrainConfig) -> dict:
    """Train a whole job as `shardwise train` would (see shardwise.api.run)."""
    from shardwise.api import run as run_job  # imports torch's launcher only when used

    return run_job(config)


__all__ = ["Session", "ShardwiseError", "TrainConfig", "__version__", "run", "setup"]
__version__ = "0.1.0"
