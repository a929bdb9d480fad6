"""How replicas agree: one small interface, one module per synchronisation strategy.

    strategy = sync_strategy("allreduce")
    module = strategy.wrap(stage, layout, env)       # once, after stages and tensor parallel
    with strategy.skipping(module): ...              # inner accumulation micro-steps
    strategy.after_backward(module, layout)          # after a step's last backward
    strategy.after_step(module, layout)              # after the optimizer step

A strategy changes a model or how its gradients and parameters travel between replicas; it
never owns the training loop. The loop (`ParallelModel`, `Session`, the trainer) calls these
four hooks at the same places for every strategy, so gradient aggregation (every step, or
compressed through DDP comm hooks), model averaging (after the optimizer step, every H steps),
an outer optimizer (a pseudo-gradient step in `after_step`) and sharded parameters (a
different `wrap`) each fit in one module: `allreduce` (optionally compressed), `local-sgd`,
`diloco` and `async` (parameter servers: the step itself moves to the servers, through `step`).
What a strategy does not override keeps `StrategyDefaults` (base.py): the loop's optimizer steps
on every rank. Their settings come in one `SyncOptions`. Each keeps a `SyncTraffic`, the bytes
it handed to collectives and the time they held the rank up, measured (see traffic.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import nn

from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import Layout
from shardwise.parallel.sync.allreduce import AllReduceEveryStep
from shardwise.parallel.sync.async_ps import AsyncUpdates
from shardwise.parallel.sync.base import StrategyDefaults
from shardwise.parallel.sync.diloco import DiLoCo
from shardwise.parallel.sync.local_sgd import PeriodicAveraging
from shardwise.parallel.sync.options import SyncOptions
from shardwise.parallel.sync.traffic import SyncTraffic


class SyncStrategy(Protocol):
    """What the loop needs from a way of keeping the data-parallel replicas in agreement."""

    name: str
    # Whether replicas' parameters or optimizer states may differ between steps: then a
    # checkpoint keeps every replica's own copy, so that a resume is exact.
    replicas_differ: bool
    # Whether ranks may meet in a collective between steps (metrics windows, checkpoints): not
    # asynchronous workers, which are at different steps and meet only at the end.
    meets_between_steps: bool
    # What this rank sent and how long exchanges after the step blocked it (see traffic.py).
    traffic: SyncTraffic

    def wrap(self, module: nn.Module, layout: Layout, env: DistEnv) -> nn.Module:
        """The module forward and backward run through (this rank's stage or shard inside)."""
        ...

    def skipping(self, module: nn.Module) -> AbstractContextManager[None]:
        """A context for inner accumulation micro-steps: no communication in it."""
        ...

    def after_backward(self, module: nn.Module, layout: Layout) -> None:
        """Called once the step's last backward is done, before clipping."""
        ...

    def after_step(self, module: nn.Module, layout: Layout) -> None:
        """Called after every optimizer step."""
        ...

    def finish(self, module: nn.Module, layout: Layout) -> None:
        """Called after a run's last optimizer step: leave the replicas in agreement."""
        ...

    def clip_norm(self, max_norm: float) -> float:
        """The norm this rank clips its gradient to (0: measure only, the step clips elsewhere)."""
        ...

    def step(self, optimizer_step: Callable[[], None], module: nn.Module, layout: Layout) -> None:
        """The optimizer step: `optimizer_step()` then `after_step`, or the strategy's own."""
        ...

    def steps_done(self, local_steps: int, max_steps: int) -> int:
        """The run's optimizer steps done once this rank has taken `local_steps`."""
        ...

    def evaluation_share(self, batches: int, layout: Layout, env: DistEnv) -> tuple[range, int]:
        """Which of `batches` held-out batches this rank evaluates, and over how many ranks."""
        ...

    def warm_up(self, layout: Layout) -> None:
        """Run its code once on a toy, so that what the code costs once (imports, caches) is
        in a rank's memory baseline, not counted as the run's state. A collective where `wrap`
        is one."""
        ...

    def saves_here(self, env: DistEnv) -> bool:
        """Whether this rank writes its part of a checkpoint."""
        ...

    def lost_replicas(self) -> dict[int, str] | None:
        """{rank: why} of replicas that left the run on the way (None: a lost rank ends it)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep for an exact resume (tensors only)."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


SYNC_STRATEGIES: dict[str, type[SyncStrategy]] = {
    strategy.name: strategy
    for strategy in (AllReduceEveryStep, PeriodicAveraging, DiLoCo, AsyncUpdates)
}


def sync_strategy(name: str, options: SyncOptions | None = None) -> SyncStrategy:
    """A fresh strategy named `name` (see SYNC_STRATEGIES) with `options`.

    >>> sync_strategy("local-sgd", SyncOptions(sync_every=4)).options.sync_every
    4
    """
    if name not in SYNC_STRATEGIES:
        raise ShardwiseError(f"--sync {name}: choose one of {', '.join(SYNC_STRATEGIES)}")
    return SYNC_STRATEGIES[name](options)  # type: ignore[call-arg]


__all__ = [
    "SYNC_STRATEGIES",
    "AllReduceEveryStep",
    "AsyncUpdates",
    "DiLoCo",
    "PeriodicAveraging",
    "StrategyDefaults",
    "SyncOptions",
    "SyncStrategy",
    "SyncTraffic",
    "sync_strategy",
]
