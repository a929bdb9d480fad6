"""Say who has joined while a node waits for the others, and when the run is complete.

    with waiting_for_nodes(store, endpoint="10.0.0.1:29500", nnodes=2):
        info = handler.next_rendezvous()     # blocks until every node is there

A node waiting at the rendezvous used to be silent until the run started or the join timed
out. Each node adds itself to a counter in the job's store as it arrives; while the block runs,
a thread prints `shardwise: waiting for nodes at HOST:PORT: 1/2 joined (10s)` every
`every_s`, and once the block is done one line says the node is in. A node that never waited
long prints only that last line, so a run started on every node at once stays quiet.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

import torch.distributed as dist

JOINED_KEY = "shardwise/joined"


@contextlib.contextmanager
def waiting_for_nodes(
    store: dist.Store | None, endpoint: str, nnodes: int, every_s: float = 10.0
) -> Iterator[list[int]]:
    """Report the wait for `nnodes` nodes at `endpoint` while the block runs (one node: quiet).

    An elastic rendezvous (--nnodes MIN:MAX) may close with fewer: the block appends the
    number that joined to the list it is given, for the last line to say.
    """
    joined_in_the_end: list[int] = []
    if nnodes <= 1:
        yield joined_in_the_end
        return
    arrived = _count(store, 1)
    started = time.monotonic()
    done = threading.Event()

    def report() -> None:
        while not done.wait(every_s):
            joined = _count(store, 0)
            count = f"{joined}/{nnodes} joined" if joined else f"{nnodes} expected"
            seconds = time.monotonic() - started
            _say(f"waiting for nodes at {endpoint}: {count} ({seconds:.0f}s)")

    thread = threading.Thread(target=report, name="shardwise-waiting", daemon=True)
    thread.start()
    try:
        yield joined_in_the_end
    finally:
        done.set()
    place = f" (arrived {arrived} of {nnodes})" if arrived else ""
    joined = joined_in_the_end[-1] if joined_in_the_end else nnodes
    if joined < nnodes:
        _say(f"{joined} of at most {nnodes} nodes joined at {endpoint}{place}; training")
    else:
        _say(f"all {nnodes} nodes joined at {endpoint}{place}; training")


def _count(store: dist.Store | None, add: int) -> int:
    """The counter after adding `add` (0: read it); 0 when there is no store to count in."""
    if store is None:
        return 0
    try:
        return int(store.add(JOINED_KEY, add))
    except (RuntimeError, dist.DistError):
        return 0


def _say(line: str) -> None:
    print(f"shardwise: {line}", file=sys.stderr, flush=True)
