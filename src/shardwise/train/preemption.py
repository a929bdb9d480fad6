"""Preemption: SIGTERM or Ctrl-C stops every rank after the same step, with a checkpoint saved.

    with watch_signals(folder):                           # a worker's whole life (run_worker)
        ...
    if check.agreed(step, max_steps):                     # the trainer, at each step's end
        save(); raise Preempted(step, checkpoint, check.received)

SLURM and Kubernetes send SIGTERM (and SIGKILL after a grace period); a person presses Ctrl-C.
The first signal makes this process finish its current step. At each step's end the ranks sum
their flags in one tiny all-reduce, so a signal that reached the ranks at different steps still
stops all of them after the same one, where the trainer saves a checkpoint and raises
`Preempted`. A second Ctrl-C aborts at once (KeyboardInterrupt); a second SIGTERM changes
nothing. Asynchronous runs (--sync async) keep the default handling: their workers step apart
and their servers' state is not checkpointed.

Under our launcher (agent.py: its side of this) the elastic agent also sends SIGTERM when it
stops a worker group after a failure (to restart it, or for good). That is no preemption: the
launcher writes PREEMPT_FILE into its folder before it passes a signal on, and a SIGTERM without
it ends the worker at once, as SIGTERM's default would.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import torch

from shardwise.config import TrainConfig
from shardwise.distributed import DistEnv, all_reduce_sum
from shardwise.handoff import (
    EXIT_INTERRUPTED,
    EXIT_STOPPED,
    PREEMPT_FILE,
    write_record,
)

# Where the CLI and older callers look for them; they are the hand-off's (handoff.py).
from shardwise.handoff import EXIT_PREEMPTED as EXIT_PREEMPTED
from shardwise.handoff import GIVE_UP_SIGNAL as GIVE_UP_SIGNAL
from shardwise.handoff import Preempted as Preempted
from shardwise.parallel.sync import SYNC_STRATEGIES
from shardwise.train.restarts import note_progress

STOPPED_FILE = "stopped-rank{rank}.json"
# How long a worker's SIGTERM waits for the launcher's word: SLURM signals every process of a
# job at once, so the launcher may still be writing it.
_WORD_WAIT_S = 0.5


def preemptible(config: TrainConfig) -> bool:
    """Whether signals stop this run gracefully: where its ranks meet between steps, to agree on
    the step to stop after (not --sync async: see the module docstring)."""
    return SYNC_STRATEGIES[config.sync].meets_between_steps


class _Watch:
    """This process's signal state: set by the watcher thread, read at each step's end."""

    requested: str | None = None  # the first signal's name, once one asked to stop
    folder: Path | None = None  # the launcher's folder (None: no launcher of ours)
    abort = False  # a second Ctrl-C came: the main thread raises KeyboardInterrupt once


@contextlib.contextmanager
def watch_signals(folder: Path | None, enabled: bool = True) -> Iterator[None]:
    """Take SIGTERM and SIGINT for a graceful stop while the block runs (main thread only).

    with watch_signals(None):   # one process: Ctrl-C now finishes the step and saves it
        summary = train(config, env)

    The decisions are a thread's, woken through `signal.set_wakeup_fd`: a Python handler runs
    only once the main thread is back in the interpreter, so a worker blocked in a collective
    whose peer died would otherwise outlive the agent's SIGTERM until the grace period ends.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    _Watch.requested, _Watch.folder, _Watch.abort = None, folder, False
    watcher = threading.Thread(target=_watch, args=(read_end,), name="shardwise-signals")
    watcher.daemon = True
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Told to return, not left to see the pipe close: processes forked meanwhile (data
        # loading workers) hold its write end open for as long as they live.
        os.write(write_end, bytes([_STOP_WATCHING]))
        os.close(write_end)
        watcher.join()
        _Watch.requested, _Watch.folder, _Watch.abort = None, None, False


_STOP_WATCHING = 0  # no signal's number: the block is over


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The main thread's part: only the abort a second Ctrl-C asked for (see _decide)."""
    if _Watch.abort:
        _Watch.abort = False
        raise KeyboardInterrupt


def _watch(read_end: int) -> None:
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(64):
            for signum in chunk:
                if signum == _STOP_WATCHING:
                    return
                _decide(signum)


def _decide(signum: int) -> None:
    if signum not in (signal.SIGTERM, signal.SIGINT):
        return
    if _Watch.requested is not None:
        if signum == signal.SIGINT:  # a second Ctrl-C: abort at once
            if _Watch.folder is not None:
                os._exit(EXIT_INTERRUPTED)  # a worker: the launcher says what happened
            _Watch.abort = True
            _thread.interrupt_main(signal.SIGINT)  # runs _on_signal in the main thread
        return  # already stopping: a repeated SIGTERM changes nothing
    folder = _Watch.folder
    if signum == signal.SIGTERM and folder is not None and not _launcher_preempts(folder):
        # The agent is stopping this group after a failure: a note for the next attempt (this
        # rank was not the cause), then the end SIGTERM's default would have been.
        write_record(folder, STOPPED_FILE, {"stopped": True})
        os._exit(EXIT_STOPPED)
    _Watch.requested = signal.Signals(signum).name


def _launcher_preempts(folder: Path) -> bool:
    deadline = time.monotonic() + _WORD_WAIT_S
    while not (folder / PREEMPT_FILE).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class PreemptionCheck:
    """The trainer's end-of-step question: did a signal ask every rank to stop here?

    check = PreemptionCheck.for_config(config, env, folder)   # folder: the launcher's, or None
    """

    def __init__(self, env: DistEnv, folder: Path | None = None, enabled: bool = True) -> None:
        self.env = env
        self.folder = folder
        self.enabled = enabled

    @classmethod
    def for_config(
        cls, config: TrainConfig, env: DistEnv, folder: Path | None = None
    ) -> PreemptionCheck:
        """Off for --sync async: its workers step apart, so no per-step collective can agree."""
        return cls(env, folder, enabled=preemptible(config))

    @property
    def received(self) -> str:
        """The signal this rank got; a peer's, when only a peer got one."""
        return _Watch.requested or "a signal to another rank"

    def agreed(self, step: int, max_steps: int) -> bool:
        """Whether to stop after `step`; every rank must call it after every step.

        False at the last step: the run then simply finishes.
        """
        if self.folder is not None and self.env.is_main:
            note_progress(self.folder, step)
        if step >= max_steps or not self.enabled:
            return False
        flag = torch.tensor([1.0 if _Watch.requested else 0.0], dtype=torch.float64)
        return bool(all_reduce_sum(flag, self.env).item() > 0)
