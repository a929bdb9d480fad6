"""Liveness apart from the collectives: every rank beats, and the next rank notices silence.

    with heartbeat(silence_s=15, on_silence=report):   # a worker's whole run (torchrun's env)
        train(...)

Each rank's daemon thread bumps a counter in the job's rendezvous store every second and
watches the counter of the rank after it (a ring, so every rank is watched once). A counter
that has not moved for `silence_s` by the watcher's own clock (no clock agreement needed)
means that rank is stopped (SIGSTOP), deadlocked with the interpreter lock held, or its
machine is gone. The watcher kills it when it runs on the same machine and is provably this
job's worker (`is_job_worker`; a stopped process cannot be asked to leave), calls `on_silence`
with one line naming the rank and its host, and the caller ends the watcher's own process: the
launcher restarts the group or reports that line. A step that legitimately takes minutes
never trips it, since the threads beat on while the main thread computes or waits in a
collective: only `--timeout-s` bounds those.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import torch.distributed as dist

from shardwise.distributed import job_store
from shardwise.signed_store import SECRET_ENV, StoreTampered

BEAT_S = 1.0
DONE = b"done"


class Heartbeat:
    """This rank's beating and watching thread, over a key-value store."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        silence_s: float,
        on_silence: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        expendable: frozenset[int] = frozenset(),
        on_tampered: Callable[[StoreTampered], None] | None = None,
    ) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.on_tampered = on_tampered or (lambda exc: on_silence(str(exc)))
        self.expendable = expendable  # killed when silent, and the run goes on (see below)
        self.watched = (rank + 1) % world_size
        self.silence_s, self.on_silence, self.clock = silence_s, on_silence, clock
        self.beats = 0
        self.last_seen: tuple[bytes, float] | None = None
        self.stopped = threading.Event()
        self.watching = True  # until every other rank has finished or left
        store.set(f"host/{rank}", f"{socket.gethostname()} {os.getpid()}")

    def beat(self) -> None:
        self.beats += 1
        self.store.set(f"beat/{self.rank}", str(self.beats))

    def watch(self) -> str | None:
        """The line to report when the watched rank has been silent too long, else None."""
        if not self.watching:
            return None
        key = f"beat/{self.watched}"
        now = self.clock()
        value = self.store.get(key) if self.store.check([key]) else b""
        if value == DONE:  # it left its work behind: watch the one it was watching
            self._pass_watch()
            return None
        if self.last_seen is None or value != self.last_seen[0]:
            self.last_seen = (value, now)
            return None
        silent = now - self.last_seen[1]
        if silent < self.silence_s:
            return None
        host, pid = self.store.get(f"host/{self.watched}").decode().rsplit(" ", 1)
        if host == socket.gethostname() and is_job_worker(int(pid), self.watched):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)  # stopped: it could not leave by itself
            if self.watched in self.expendable:  # its supervisor marks it done, and says so
                self._pass_watch()
                return None
        return (
            f"rank {self.watched} on {host} stopped answering: no heartbeat for {silent:.0f}s "
            "(stopped, deadlocked or its machine is gone)"
        )

    def _pass_watch(self) -> None:
        """Watch the next rank instead; none once the ring has come back to this one."""
        self.watched = (self.watched + 1) % self.world_size
        self.last_seen = None
        self.watching = self.watched != self.rank

    def run(self) -> None:
        while not self.stopped.wait(BEAT_S):
            try:
                self.beat()
                line = self.watch()
            except StoreTampered as exc:  # nothing it says can be believed; no restart cures that
                self.on_tampered(exc)
                return
            except (RuntimeError, dist.DistError):
                return  # the store went away: the job is ending, the launcher knows why
            if line is not None:
                self.on_silence(line)
                return


def is_job_worker(pid: int, rank: int) -> bool:
    """Whether process `pid` is provably this job's worker `rank`, never ourselves.

        is_job_worker(12345, rank=1)   # False for any process that is not the job's rank 1

    The store only says which pid to look at; the proof is the process's own environment
    (/proc/PID/environ, readable only by its user and root): the job's secret and run id and
    the rank that torch's agent gave it. Without a secret (a torchrun of the user's own) the
    run id, store address and rank must match.
    """
    if pid <= 1 or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            entries = handle.read().split(b"\0")
    except OSError:
        return False
    theirs = dict(entry.split(b"=", 1) for entry in entries if b"=" in entry)
    names = (SECRET_ENV, "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")
    ours = {name.encode(): os.environ.get(name, "").encode() for name in names}
    if not ours[b"TORCHELASTIC_RUN_ID"] or not ours[b"MASTER_PORT"]:
        return False
    return theirs.get(b"RANK") == str(rank).encode() and all(
        theirs.get(name, b"") == value for name, value in ours.items()
    )


@contextlib.contextmanager
def heartbeat(
    silence_s: float,
    on_silence: Callable[[str], None],
    expendable: frozenset[int] = frozenset(),
    on_tampered: Callable[[StoreTampered], None] | None = None,
) -> Iterator[Heartbeat | None]:
    """Beat and watch for the duration of the block (nothing alone or with `silence_s` 0).

    Ranks are the launcher's (RANK, WORLD_SIZE), parameter servers included. A silent rank in
    `expendable` (an asynchronous worker but rank 0) is killed, and the run goes on without it.
    A value in the store that the job's secret did not sign goes to `on_tampered`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2 or silence_s <= 0 or "MASTER_ADDR" not in os.environ:
        yield None
        return
    store = job_store("heartbeat")
    rank = int(os.environ["RANK"])
    beating = Heartbeat(
        store,
        rank,
        world_size,
        silence_s,
        on_silence,
        expendable=expendable,
        on_tampered=on_tampered,
    )
    beating.beat()
    thread = threading.Thread(target=beating.run, name="shardwise-heartbeat", daemon=True)
    thread.start()
    try:
        yield beating
    finally:
        beating.stopped.set()
        with contextlib.suppress(RuntimeError, dist.DistError):
            mark_done(store, rank)


def mark_done(store: dist.Store, rank: int) -> None:
    """Say that `rank` finished (or left an asynchronous run): silent, but not hung."""
    store.set(f"beat/{rank}", DONE.decode())
