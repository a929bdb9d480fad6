"""shardwise: train PyTorch sequence models across devices and processes.

import shardwise
result = shardwise.run(shardwise.TrainConfig(model="gru"))   # a whole run; result.eval_loss
session = shardwise.setup()          # your own loop: see README, five changed lines
loss = shardwise.launch(my_train, 2, "lstm")   # your own loop on 2 local worker processes
plan = shardwise.plan(shardwise.TrainConfig(pp=2))           # what --dry-run prints
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from shardwise.config import TrainConfig
from shardwise.errors import ShardwiseError

if TYPE_CHECKING:
    from shardwise.preflight import RunPlan
    from shardwise.report.result import RunResult
    from shardwise.session import Session, setup

T = TypeVar("T")
# Loaded on first use: the session, the result and the planner import torch.distributed's
# checkpointing and safetensors, which `python -m shardwise` must not import before it has taken
# the working directory off sys.path (see __main__.py).
_LAZY = {
    "Session": "shardwise.session",
    "setup": "shardwise.session",
    "RunResult": "shardwise.report.result",
    "RunPlan": "shardwise.preflight",
}


def run(config: TrainConfig) -> RunResult | None:
    """Train a whole run as `shardwise train` would (see shardwise.api.run)."""
    from shardwise.api import run as run_here

    return run_here(config)


def plan(config: TrainConfig) -> RunPlan:
    """What `run(config)` would train, checked, without starting a worker (see shardwise.api)."""
    from shardwise.api import plan as plan_here

    return plan_here(config)


def launch(fn: Callable[..., T], nproc: int, *args: object) -> T:
    """Run `fn(*args)` on `nproc` local workers; rank 0's return (see shardwise.agent.launch)."""
    from shardwise.agent import launch as launch_here

    return launch_here(fn, nproc, *args)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shardwise' has no attribute {name!r}")


__all__ = [
    "RunPlan",
    "RunResult",
    "Session",
    "ShardwiseError",
    "TrainConfig",
    "__version__",
    "launch",
    "plan",
    "run",
    "setup",
]
__version__ = "0.1.0"
