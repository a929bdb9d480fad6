"""The heartbeat's watcher: silence by the watcher's clock becomes one line (and a kill)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from shardwise.train.heartbeat import Heartbeat, is_job_worker

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


_JOB = {
    "TORCHELASTIC_RUN_ID": "job1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29999",
    "SHARDWISE_JOB_SECRET": "s" * 64,
}


def job_worker(monkeypatch: pytest.MonkeyPatch, rank: int, **other: str) -> subprocess.Popen:
    """A process standing in for the job's worker `rank`: the environment the agent gives one."""
    for name, value in _JOB.items():
        monkeypatch.setenv(name, value)
    environment = {**os.environ, "RANK": str(rank), **other}
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env=environment
    )
    # /proc/PID/environ can still show the parent's for a moment after Popen returns.
    deadline = time.monotonic() + 10
    rank_entry = f"RANK={environment['RANK']}".encode()
    while time.monotonic() < deadline:
        with open(f"/proc/{process.pid}/environ", "rb") as handle:
            if rank_entry in handle.read().split(b"\0"):
                break
        time.sleep(0.01)
    return process


def watched_until_silent(
    process: subprocess.Popen, world_size: int = 2, expendable: frozenset[int] = frozenset()
) -> tuple[Heartbeat, str | None]:
    """Rank 0 watching rank 1, recorded in the store as `process` here, past its silence."""
    store = dist.HashStore()
    clock = Clock()
    watcher = Heartbeat(store, 0, world_size, 5.0, print, clock, expendable=expendable)
    store.set("host/1", f"{socket.gethostname()} {process.pid}")
    watcher.watch()
    clock.now += 5.0
    return watcher, watcher.watch()


def test_a_silent_neighbour_on_this_machine_is_killed(monkeypatch) -> None:
    stopped = job_worker(monkeypatch, rank=1)
    try:
        _, line = watched_until_silent(stopped)
        assert line is not None
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


@pytest.mark.parametrize(
    "unlike",
    [
        {"SHARDWISE_JOB_SECRET": "another job's"},
        {"TORCHELASTIC_RUN_ID": "job2"},
        {"RANK": "2"},
        {"MASTER_PORT": "1"},
    ],
    ids=["other-secret", "other-run", "other-rank", "other-store"],
)
def test_a_process_the_store_names_is_killed_only_when_it_proves_to_be_the_job_s(
    monkeypatch, unlike: dict[str, str]
) -> None:
    bystander = job_worker(monkeypatch, rank=1, **unlike)
    try:
        _, line = watched_until_silent(bystander)
        assert line is not None  # still reported as silent
        time.sleep(0.5)
        assert bystander.poll() is None, "killed on the store's word alone"
    finally:
        bystander.kill()
        bystander.wait()


def test_the_watcher_never_kills_itself_or_init(monkeypatch) -> None:
    for name, value in _JOB.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RANK", "1")
    assert not is_job_worker(os.getpid(), 1)
    assert not is_job_worker(1, 1)


def test_a_silent_expendable_rank_is_killed_and_not_reported(monkeypatch) -> None:
    stopped = job_worker(monkeypatch, rank=1)
    try:
        watcher, line = watched_until_silent(stopped, 3, expendable=frozenset({1}))
        assert line is None  # an asynchronous worker: the run goes on without it
        assert stopped.wait(timeout=10) == -9
        assert watcher.watched == 2
    finally:
        stopped.kill()
