"""Split each step's time on this rank into its own compute and waiting for the other ranks.

    clock = StepClock(model.parameters())
    clock.start(); ...backward of the last micro-step...; clock.backward_done()
    compute_s, wait_s = clock.stop()

A post-accumulate-grad hook marks when this rank's last gradient is ready. Under DDP the backward
then only returns once every rank's buckets are all-reduced: the time from that last gradient to
the end of backward is spent waiting for the slowest rank (and the final bucket's transfer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from torch import nn


class StepClock:
    """Per-step compute and wait seconds of this rank.

    clock = StepClock(model.parameters(), clock=fake_clock)   # a test's clock makes it exact
    """

    def __init__(
        self, parameters: Iterable[nn.Parameter], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.clock = clock
        self.last_gradient: float | None = None
        self.started = self.backward_end = 0.0
        self.last_compute: float | None = None  # the previous step's compute seconds
        for parameter in parameters:
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(self._gradient_ready)

    def _gradient_ready(self, _: nn.Parameter) -> None:
        self.last_gradient = self.clock()

    def start(self) -> None:
        """Begin a step."""
        self.started = self.clock()
        self.last_gradient = None

    def backward_done(self) -> None:
        self.backward_end = self.clock()

    def stop(self) -> tuple[float, float]:
        """(compute seconds, wait seconds) of the step since `start`."""
        total = self.clock() - self.started
        ready = self.last_gradient if self.last_gradient is not None else self.backward_end
        wait = max(0.0, self.backward_end - ready)
        self.last_compute = max(0.0, total - wait)
        return total - wait, wait
