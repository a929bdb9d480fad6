"""Asynchronous workers meet in the store, and a worker marked as left is not waited for."""

from __future__ import annotations

import threading

import pytest
import torch.distributed as dist

from shardwise.parallel.sync.meeting import Meeting, mark_left

pytestmark = pytest.mark.timeout(30)


def gather_all(store: dist.Store, parts: dict[int, bytes]) -> dict[int, dict[int, bytes]]:
    """Each rank in `parts` gathers its part on a thread of its own; what each got back."""
    members = [0, 1, 2]
    got: dict[int, dict[int, bytes]] = {}

    def one(rank: int) -> None:
        got[rank] = Meeting(store, rank, members, timeout_s=10).gather(parts[rank])

    threads = [threading.Thread(target=one, args=(rank,)) for rank in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return got


def test_every_member_gets_every_part() -> None:
    got = gather_all(dist.HashStore(), {0: b"a", 1: b"b", 2: b"c"})
    assert got == {rank: {0: b"a", 1: b"b", 2: b"c"} for rank in range(3)}


def test_a_member_marked_as_left_is_skipped_and_named() -> None:
    store = dist.HashStore()
    mark_left(store, 1, "died of SIGKILL")
    meeting = Meeting(store, 0, [0, 1, 2], timeout_s=10)
    store.set("meet/0/2", b"c")
    assert meeting.gather(b"a") == {0: b"a", 2: b"c"}
    assert meeting.lost == {1: "died of SIGKILL"}


def test_a_part_posted_before_dying_still_counts_for_everyone() -> None:
    store = dist.HashStore()
    store.set("meet/0/1", b"b")  # posted, then died
    mark_left(store, 1, "died of SIGKILL")
    got = gather_all(store, {0: b"a", 2: b"c"})
    assert got[0] == got[2] == {0: b"a", 1: b"b", 2: b"c"}


def test_a_silent_member_that_did_not_leave_times_out() -> None:
    meeting = Meeting(dist.HashStore(), 0, [0, 1], timeout_s=0.2)
    with pytest.raises(RuntimeError, match=r"Timed out .* worker 1"):
        meeting.gather(b"a")
