"""Checkpoints that write while training goes on: DCP's async save, sealed like any other.

    writer = CheckpointWriter(timeout_s=300)
    snapshot = take_snapshot(directory, model, optimizer, state)  # the live tensors, named
    path = writer.save(snapshot, env, background=True)  # returns once they are copied
    writer.wait()   # sealed (or the save's one-line error) on every rank

`background=True` copies the tensors into CPU memory (DCP's stager) and returns; a thread
writes the shards (`torch.distributed.checkpoint.async_save`), then seals the checkpoint exactly
as a foreground save does (`save.seal`: digests, trainer state, manifest, rename), so until
every rank's shards are on disk it is a `.partial` directory that nothing resumes from. The
background collectives run on a gloo group of their own, so they never interleave with the
training loop's. One save is in flight at a time: the next save, of either kind, first waits
for it, and so does `wait`. A failed background save is raised there, on every rank alike.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from shardwise.checkpoint.disk import SAVE_ERRORS
from shardwise.checkpoint.save import Snapshot, seal, start_partial, write_checkpoint
from shardwise.distributed import DistEnv

# A single process has no group; DCP warns from its writing thread that it will save alone, as
# intended. `catch_warnings` cannot reach another thread, hence a filter for that message alone.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class CheckpointWriter:
    """Saves checkpoints in the foreground or the background, one in flight at a time."""

    def __init__(self, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        self._group: dist.ProcessGroup | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._pending: Future[Path] | None = None

    def save(self, snapshot: Snapshot, env: DistEnv, background: bool = False) -> Path:
        """Save `snapshot` (`save.take_snapshot`); returns the path it has once sealed.

        In the foreground that is at once; in the background, once `wait` or the next save
        returned. Every rank must call it alike.
        """
        self.wait()
        if not background:
            return write_checkpoint(snapshot, env)
        start_partial(snapshot, env)
        group = self._background_group(env)
        writing = dcp.async_save(
            snapshot.tensors, checkpoint_id=snapshot.partial, process_group=group
        )
        snapshot.tensors = {}  # the staged copy is DCP's now; do not pin the live tensors
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="shardwise-checkpoint")
        self._pending = self._thread.submit(_write_then_seal, writing, snapshot, env, group)
        return snapshot.final

    def wait(self) -> Path | None:
        """Block until the save in flight is sealed; its path, or None if none was in flight."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    @property
    def in_flight(self) -> bool:
        """Whether a background save has not been waited for yet."""
        return self._pending is not None

    def _background_group(self, env: DistEnv) -> dist.ProcessGroup | None:
        if not env.distributed:
            return None
        if self._group is None:  # every rank reaches its first background save together
            timeout = timedelta(seconds=self.timeout_s)
            self._group = dist.new_group(backend="gloo", timeout=timeout)
        return self._group


def _write_then_seal(
    writing: Future, snapshot: Snapshot, env: DistEnv, group: dist.ProcessGroup | None
) -> Path:
    failed = None
    try:
        writing.result()
    except SAVE_ERRORS as exc:  # agreed on and reported by seal()
        failed = exc
    return seal(snapshot, env, group, failed=failed)
