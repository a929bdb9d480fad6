"""Split each step's time on this rank into its own compute and waiting for the other ranks.

    clock = StepClock(model.parameters())
    clock.start(); ...backward of the last micro-step...; clock.backward_done()
    compute_s, wait_s = clock.stop()

A post-accumulate-grad hook marks when this rank's last gradient is ready. Under DDP the backward
then only returns once every rank's buckets are all-reduced: the time from that last gradient to
the end of backward is spent waiting for the slowest rank (and the final bucket's transfer).

Testing aid, not a user setting: `SHARDWISE_TESTING_SLOW_RANK="RANK:FACTOR"` (e.g. "1:2") makes
global rank RANK a straggler whose compute takes FACTOR times as long (see `StepClock.start`).
Tests and benchmarks/sync_strategies.py use it; it has no CLI flag on purpose.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from torch import nn

from shardwise.errors import ShardwiseError

SLOW_RANK_ENV = "SHARDWISE_TESTING_SLOW_RANK"


class StepClock:
    """Per-step compute and wait seconds of this rank (and the straggler testing aid).

    clock = StepClock(model.parameters(), slowdown=2.0)   # this rank computes 2x slower
    """

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        clock: Callable[[], float] = time.perf_counter,
        slowdown: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.clock = clock  # a test's fake clock makes the split exact
        self.sleep = sleep
        self.slowdown = testing_slowdown() if slowdown is None else slowdown
        self.last_gradient: float | None = None
        self.started = self.backward_end = 0.0
        self.injected = 0.0  # this step's added straggler seconds
        self.last_compute: float | None = None  # the previous step's own compute, without them
        for parameter in parameters:
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(self._gradient_ready)

    def _gradient_ready(self, _: nn.Parameter) -> None:
        self.last_gradient = self.clock()

    def start(self) -> None:
        """Begin a step; a straggler first sleeps (slowdown - 1) x the previous step's compute.

        The sleep comes before the forward, so the rank joins this step's collectives (DDP's
        bucket all-reduces during backward, an exchange after the optimizer step) as late as a
        rank with that much slower compute would; a sleep at the first ready gradient instead
        would race DDP's own hooks on the same event. The previous step stands in for this one
        (the first step is not slowed), and the injected seconds are left out of that estimate
        so that the slowdown does not compound. They do count as compute, as a slow rank's would.
        """
        self.started = self.clock()
        self.last_gradient = None
        self.injected = 0.0
        if self.slowdown > 1 and self.last_compute is not None:
            self.injected = (self.slowdown - 1) * self.last_compute
            self.sleep(self.injected)

    def backward_done(self) -> None:
        self.backward_end = self.clock()

    def stop(self) -> tuple[float, float]:
        """(compute seconds, wait seconds) of the step since `start`."""
        total = self.clock() - self.started
        ready = self.last_gradient if self.last_gradient is not None else self.backward_end
        wait = max(0.0, self.backward_end - ready)
        self.last_compute = max(0.0, total - wait - self.injected)
        return total - wait, wait


def testing_slowdown(environ: dict[str, str] | None = None) -> float:
    """This rank's compute slowdown from SHARDWISE_TESTING_SLOW_RANK="RANK:FACTOR" (else 1.0).

    testing_slowdown({"SHARDWISE_TESTING_SLOW_RANK": "1:2", "RANK": "1"})   # 2.0
    """
    environ = dict(os.environ) if environ is None else environ
    value = environ.get(SLOW_RANK_ENV, "").strip()
    if not value:
        return 1.0
    try:
        rank_text, factor_text = value.split(":")
        rank, factor = int(rank_text), float(factor_text)
    except ValueError:
        rank, factor = -1, 0.0
    if rank < 0 or not factor >= 1:
        raise ShardwiseError(
            f"{SLOW_RANK_ENV}={value!r}: expected RANK:FACTOR with FACTOR >= 1, e.g. '1:2'; "
            "fix or unset it (a testing aid)"
        )
    return factor if int(environ.get("RANK", "0")) == rank else 1.0
