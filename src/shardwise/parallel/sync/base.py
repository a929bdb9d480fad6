"""What every strategy does unless it says otherwise: the loop's optimizer steps on every rank.

    class AllReduceEveryStep(StrategyDefaults): ...   # keeps every default
    strategy.step(lambda: optimizer.step(), module, layout)   # Session.step, for any strategy

The synchronous strategies (allreduce, local-sgd, diloco) keep these; the asynchronous one
(async_ps.py), whose step happens on parameter servers and whose workers go at their own pace,
overrides them. The loop calls them without asking which strategy it has.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from shardwise.distributed import DistEnv
from shardwise.parallel.mesh import Layout


class StrategyDefaults:
    """The defaults of `SyncStrategy`'s step, step count, evaluation share and saving."""

    # Whether ranks may meet in a collective between steps (metrics windows, checkpoints,
    # evaluations mid-run): every rank is at the same step.
    meets_between_steps = True

    def warm_up(self, layout: Layout) -> None:
        """Run its code once on a toy before a rank's memory baseline (here: nothing to run)."""

    def after_step(self, module: nn.Module, layout: Layout) -> None:
        """Called after every optimizer step (here: nothing)."""

    def clip_norm(self, max_norm: float) -> float:
        """The norm this rank clips its gradient to: `max_norm` (0: measure only).

        >>> StrategyDefaults().clip_norm(1.0)
        1.0
        """
        return max_norm

    def step(self, optimizer_step: Callable[[], None], module: nn.Module, layout: Layout) -> None:
        """The optimizer step: `optimizer_step()` on this rank, then `after_step`."""
        optimizer_step()
        self.after_step(module, layout)

    def steps_done(self, local_steps: int, max_steps: int) -> int:
        """The run's optimizer steps done once this rank has taken `local_steps`: the same.

        >>> StrategyDefaults().steps_done(3, max_steps=10)
        3
        """
        return local_steps

    def evaluation_share(self, batches: int, layout: Layout, env: DistEnv) -> tuple[range, int]:
        """Which of `batches` held-out batches this rank evaluates, and how many ranks share
        them out: dealt to the data-parallel replicas in turn."""
        return range(layout.data_rank, batches, layout.data_ranks), layout.data_ranks

    def saves_here(self, env: DistEnv) -> bool:
        """Whether this rank writes its part of a checkpoint: every rank does."""
        return True

    def lost_replicas(self) -> dict[int, str] | None:
        """The replicas that left the run on the way, {rank: why}; None: a run never goes on
        without one (a lost rank ends it)."""
        return None
