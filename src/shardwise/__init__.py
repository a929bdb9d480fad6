"""shardwise: train PyTorch sequence models across devices and processes.

import shardwise
session = shardwise.setup()          # your own loop: see README, five changed lines
"""

from __future__ import annotations

from shardwise.errors import ShardwiseError
from shardwise.session import Session, setup

__all__ = ["Session", "ShardwiseError", "__version__", "setup"]
__version__ = "0.1.0"
