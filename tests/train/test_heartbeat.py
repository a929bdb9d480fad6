"""The heartbeat's watcher: silence by the watcher's clock becomes one line (and a kill)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

from shardwise.train.heartbeat import Heartbeat

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pair(silence_s: float = 10.0) -> tuple[Heartbeat, Heartbeat, Clock]:
    store = dist.HashStore()
    clock = Clock()
    lines: list[str] = []
    first = Heartbeat(store, 0, 2, silence_s, lines.append, clock)
    second = Heartbeat(store, 1, 2, silence_s, lines.append, clock)
    return first, second, clock


def test_a_beating_neighbour_is_never_reported() -> None:
    first, second, clock = pair()
    for _ in range(30):
        second.beat()
        assert first.watch() is None
        clock.now += 1.0


def test_a_silent_neighbour_is_reported_once_silence_lasts() -> None:
    first, second, clock = pair(silence_s=10.0)
    second.beat()
    assert first.watch() is None  # first sight
    clock.now += 9.0
    assert first.watch() is None  # silent, not yet long enough
    clock.now += 1.5
    line = first.watch()
    assert line is not None
    assert line.startswith(f"rank 1 on {socket.gethostname()} stopped answering")
    assert "no heartbeat for 10s" in line


def test_a_neighbour_that_never_beat_counts_from_first_sight() -> None:
    store = dist.HashStore()
    clock = Clock()
    watcher = Heartbeat(store, 0, 2, 5.0, print, clock)
    store.set("host/1", f"elsewhere {999999}")
    assert watcher.watch() is None
    clock.now += 6.0
    assert watcher.watch() == (
        "rank 1 on elsewhere stopped answering: no heartbeat for 6s (stopped, deadlocked or its "
        "machine is gone)"
    )


def test_a_silent_neighbour_on_this_machine_is_killed() -> None:
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store = dist.HashStore()
        clock = Clock()
        watcher = Heartbeat(store, 0, 2, 5.0, print, clock)
        store.set("host/1", f"{socket.gethostname()} {stopped.pid}")
        watcher.watch()
        clock.now += 5.0
        assert watcher.watch() is not None
        assert stopped.wait(timeout=10) == -9
    finally:
        stopped.kill()


def test_a_neighbour_that_finished_is_not_silent() -> None:
    first, second, clock = pair(silence_s=5.0)
    second.beat()
    first.watch()
    second.store.set("beat/1", "done")
    clock.now += 60.0
    assert first.watch() is None


def test_the_watch_passes_over_a_finished_rank_to_the_one_it_watched() -> None:
    store = dist.HashStore()
    clock = Clock()
    lines: list[str] = []
    watcher = Heartbeat(store, 0, 3, 5.0, lines.append, clock)
    store.set("host/2", f"elsewhere {999999}")
    store.set("beat/1", "done")  # rank 1 left: rank 2, which it watched, is rank 0's now
    assert watcher.watch() is None and watcher.watched == 2
    watcher.watch()
    clock.now += 6.0
    assert (watcher.watch() or "").startswith("rank 2 on elsewhere stopped answering")
    store.set("beat/2", "done")
    assert watcher.watch() is None and not watcher.watching  # back round to itself


def test_a_silent_expendable_rank_is_killed_and_not_reported() -> None:
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store = dist.HashStore()
        clock = Clock()
        watcher = Heartbeat(store, 0, 3, 5.0, print, clock, expendable=frozenset({1}))
        store.set("host/1", f"{socket.gethostname()} {stopped.pid}")
        watcher.watch()
        clock.now += 5.0
        assert watcher.watch() is None  # an asynchronous worker: the run goes on without it
        assert stopped.wait(timeout=10) == -9
        assert watcher.watched == 2
    finally:
        stopped.kill()
