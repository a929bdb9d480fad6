"""shardwise: train PyTorch sequence models across devices and processes.

import shardwise
session = shardwise.setup()          # your own loop: see README, five changed lines
"""

from __future__ import annotations

from shardwise.errors import ShardwiseError

__all__ = ["ShardwiseError", "__version__"]
__version__ = "0.1.0"
