"""Where the workers of an asynchronous run meet: the job's store, which outlives a lost worker.

    meeting = Meeting(store, rank=1, members=[0, 1, 2], timeout_s=300)
    parts = meeting.gather(b"...")     # {rank: bytes} of every worker still in the run
    mark_left(store, rank=2, why="SIGKILL")   # said by a dead worker's supervisor

Asynchronous workers never wait for each other while they train; they meet only to start and
to sum up at the end. A process group there would fail the whole meeting for one dead member,
so they meet in the rendezvous store instead: each call posts this worker's part under the
call's sequence number and collects every other member's, skipping a member marked as left.
A part is read before the mark, so a worker that posted and then died is counted by everyone
alike. Meetings carry a few numbers each (counters, timings, a path), never tensors of weight.
"""

from __future__ import annotations

import json
import time

import torch.distributed as dist

_POLL_S = 0.01
LEFT_PREFIX = "left/"


class Meeting:
    """Collective calls through a key-value store among the workers that are still alive."""

    def __init__(self, store: dist.Store, rank: int, members: list[int], timeout_s: float) -> None:
        self.store, self.rank, self.members = store, rank, members
        self.timeout_s = timeout_s
        self.calls = 0
        self.lost: dict[int, str] = {}  # rank: why, as its supervisor said

    def gather(self, part: bytes) -> dict[int, bytes]:
        """Every live member's `part` of this call, by rank (this rank's own included)."""
        prefix = f"meet/{self.calls}/"
        self.calls += 1
        self.store.set(prefix + str(self.rank), part)
        parts: dict[int, bytes] = {}
        for member in self.members:
            found = self._wait_for(prefix + str(member), member)
            if found is not None:
                parts[member] = found
        return parts

    def _wait_for(self, key: str, member: int) -> bytes | None:
        deadline = time.monotonic() + self.timeout_s
        left = LEFT_PREFIX + str(member)
        while time.monotonic() < deadline:
            if self.store.check([key]):
                return self.store.get(key)
            if self.store.check([left]):
                self.lost[member] = json.loads(self.store.get(left))["why"]
                return None
            time.sleep(_POLL_S)
        raise RuntimeError(f"Timed out after {self.timeout_s:g}s waiting for worker {member}")


def mark_left(store: dist.Store, rank: int, why: str) -> None:
    """Say that worker `rank` is gone for good, and why: the meetings go on without it."""
    store.set(LEFT_PREFIX + str(rank), json.dumps({"why": why, "at": time.time()}))
