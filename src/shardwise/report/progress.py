"""The rank-0 progress displays: a live bar in a terminal, plain lines elsewhere.

    with TrainProgress(total_steps=400) as progress:
        progress.update(step, loss=2.31, tokens_per_s=41_200.0)
        with progress.evaluation(total_tokens=200_000, step=step) as shown:   # a second bar
            shown.update(50_000)
            shown.done(loss=2.40)

In CI logs and pipes a live bar is noise (or nothing at all), so there the display prints one
line every ~10% of the run instead: `step 120/400 loss 2.31 tok/s 41,200 eta 1m05s`; an
evaluation prints a line as it starts, one every ~10 s while it runs, and its result.
"""

from __future__ import annotations

import contextlib
import logging
import math
from time import monotonic
from types import TracebackType
from typing import Any, Self

from shardwise.report.summary import format_duration

log = logging.getLogger(__name__)

# How many plain lines a whole run prints when there is no terminal (plus the last step).
PLAIN_LINES_PER_RUN = 10
# Seconds between an evaluation's plain progress lines: long ones show they are alive.
PLAIN_EVAL_SECONDS = 10.0


class TrainProgress:
    """Show training progress on rank 0; a context manager.

        with TrainProgress(total_steps=400, start_step=100) as progress:
            progress.update(120, loss=2.31, tokens_per_s=41_200.0)

    `step` is the number of steps completed, so the last update is `update(total_steps, ...)`.
    `enabled=False` prints nothing at all. If stdout goes away (a closed
    pipe) the display turns itself off rather than stopping training.
    """

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self._progress: Any = None  # a rich Progress while the live bar is shown
        self._task: Any = None
        self._entered = False
        self._start_time = monotonic()
        self._every = max(1, math.ceil(total_steps / PLAIN_LINES_PER_RUN))
        self._last_printed = start_step

    @property
    def live(self) -> bool:
        """Whether the rich live bar is showing (a terminal), rather than plain lines."""
        return self._progress is not None

    def __enter__(self) -> Self:
        self._entered = True
        self._start_time = monotonic()
        if self.enabled:
            self._start_live_if_terminal()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop_live()

    def update(
        self, step: int, loss: float | None = None, tokens_per_s: float | None = None
    ) -> None:
        """Record that `step` steps are done, with the latest loss and throughput if known.

        progress.update(120, loss=2.31, tokens_per_s=41_200.0)
        progress.update(121, loss=None, tokens_per_s=None)   # not measured this step
        """
        if not self._entered:
            raise RuntimeError("TrainProgress.update called outside `with TrainProgress(...)`")
        if not self.enabled:
            return
        try:
            if self._progress is not None:
                loss_text = "-" if loss is None else f"{loss:.4g}"
                rate = "-" if tokens_per_s is None else f"{tokens_per_s:,.0f}"
                self._progress.update(
                    self._task, completed=step, info=f"loss {loss_text}  tok/s {rate}"
                )
            elif self._due(step):
                print(self._plain_line(step, loss, tokens_per_s), flush=True)
                self._last_printed = step
        except OSError as error:
            self._turn_off(error)

    def evaluation(self, total_tokens: int, step: int) -> EvalProgress:
        """The display of one held-out evaluation at `step`: below the live bar when it shows.

        with progress.evaluation(total_tokens=200_000, step=120) as shown:
            shown.update(50_000)
        """
        return EvalProgress(total_tokens, step, enabled=self.enabled, live=self._progress)

    def _start_live_if_terminal(self) -> None:
        self._progress = live_bar()
        if self._progress is None:
            return
        self._task = self._progress.add_task(
            "train", total=self.total_steps, completed=self.start_step, info="loss -  tok/s -"
        )
        self._progress.start()

    def _due(self, step: int) -> bool:
        if step <= self._last_printed:
            return False
        crossed_mark = step // self._every > self._last_printed // self._every
        return crossed_mark or step >= self.total_steps

    def _plain_line(self, step: int, loss: float | None, tokens_per_s: float | None) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        if tokens_per_s is not None:
            parts.append(f"tok/s {tokens_per_s:,.0f}")
        elapsed = monotonic() - self._start_time
        if step >= self.total_steps:
            parts.append(f"elapsed {format_duration(elapsed)}")
        elif step > self.start_step:
            remaining = elapsed / (step - self.start_step) * (self.total_steps - step)
            parts.append(f"eta {format_duration(remaining)}")
        return " ".join(parts)

    def _turn_off(self, error: OSError) -> None:
        log.warning("progress display turned off: %s", error)
        self.enabled = False
        self._stop_live()

    def _stop_live(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None:
            with contextlib.suppress(OSError):  # stdout is gone; nothing left to tidy
                progress.stop()


class EvalProgress:
    """Show one held-out evaluation on rank 0; a context manager.

        with EvalProgress(total_tokens=200_000, step=400) as shown:
            shown.update(50_000)   # tokens evaluated so far
            shown.done(loss=2.31)  # eval loss 2.3100 at step 400 (200,000 held-out tokens, 4.2s)

    In a terminal it is a bar, on the training bar's display (`live`) or its own; elsewhere a
    plain line as it starts and one every PLAIN_EVAL_SECONDS while it runs. Either way the
    result is printed, so a long evaluation is never silent. `enabled=False` prints nothing.
    """

    def __init__(
        self, total_tokens: int, step: int, enabled: bool = True, live: Any = None
    ) -> None:
        self.total_tokens = total_tokens
        self.step = step
        self.enabled = enabled
        self._shared = live  # the training bar's rich Progress, which outlives this evaluation
        self._progress: Any = None
        self._task: Any = None
        self._start_time = self._last_line = monotonic()

    def __enter__(self) -> Self:
        self._start_time = self._last_line = monotonic()
        if not self.enabled:
            return self
        try:
            self._progress = self._shared or live_bar()
            if self._progress is None:
                print(self._plain_line(0), flush=True)
                return self
            if self._shared is None:
                self._progress.start()
            self._task = self._progress.add_task(
                "evaluating held-out loss", total=self.total_tokens, info="tokens"
            )
        except OSError as error:
            self._turn_off(error)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._close_bar()

    def update(self, done_tokens: int) -> None:
        """Record that `done_tokens` held-out tokens are evaluated."""
        if not self.enabled:
            return
        try:
            if self._progress is not None:
                self._progress.update(self._task, completed=done_tokens)
            elif monotonic() - self._last_line >= PLAIN_EVAL_SECONDS:
                print(self._plain_line(done_tokens), flush=True)
                self._last_line = monotonic()
        except OSError as error:
            self._turn_off(error)

    def done(self, loss: float | None) -> None:
        """Print the evaluation's result (and close its bar)."""
        if not self.enabled:
            return
        self._close_bar()
        value = "-" if loss is None else f"{loss:.4f}"
        elapsed = format_duration(monotonic() - self._start_time)
        tokens = f"{self.total_tokens:,} held-out tokens"
        line = f"eval loss {value} at step {self.step} ({tokens}, {elapsed})"
        try:
            if self._shared is not None:
                self._shared.console.print(line, highlight=False)  # above the training bar
            else:
                print(line, flush=True)
        except OSError as error:
            self._turn_off(error)

    def _plain_line(self, done_tokens: int) -> str:
        return (
            f"evaluating held-out loss at step {self.step}: "
            f"{done_tokens:,}/{self.total_tokens:,} tokens"
        )

    def _close_bar(self) -> None:
        progress, self._progress = self._progress, None
        if progress is None:
            return
        with contextlib.suppress(OSError):  # stdout is gone; nothing left to tidy
            if progress is self._shared:
                progress.remove_task(self._task)
            else:
                progress.stop()

    def _turn_off(self, error: OSError) -> None:
        log.warning("evaluation progress display turned off: %s", error)
        self.enabled = False
        self._close_bar()


def live_bar() -> Any:
    """A rich Progress for the bars of a run, or None when stdout is not a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console()
    # is_interactive honours TTY_INTERACTIVE / TTY_COMPATIBLE, for users who need to force it.
    if not (console.is_interactive or console.is_jupyter):
        return None
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        refresh_per_second=4,  # enough for a human; the refresh thread competes with training
    )
