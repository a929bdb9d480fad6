"""A save that the disk refuses ends on every rank in the same one line; a bug stays a bug.

    run_agreed(make_dir if env.is_main else None, final, env)   # raises on every rank alike
    disk_failure(exc, final)   # "runs/x/checkpoints: no space left on device writing ..."

A full disk or a read-only run directory is the user's environment, not our bug: the message
names the directory, what the disk said, the newest checkpoint that is still intact and how to
go on. Each rank writes its own files, so any rank may hit it first; the ranks swap their
outcomes before anyone raises, so none is left waiting in a collective for one that gave up.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from shardwise.checkpoint.listing import latest_checkpoint
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError, first_line

# What each disk answer means, and what the user can do about it.
_NO_SPACE = "free space there (or keep fewer with --keep-checkpoints N)"
_NOT_WRITABLE = "make it writable (or pick another --run-dir)"
_DISK_ERRORS = {
    errno.ENOSPC: ("no space left on device", _NO_SPACE),
    errno.EDQUOT: ("disk quota exceeded", _NO_SPACE),
    errno.EFBIG: ("file too large for the filesystem", _NO_SPACE),
    errno.EROFS: ("read-only file system", _NOT_WRITABLE),
    errno.EACCES: ("permission denied", _NOT_WRITABLE),
    errno.EPERM: ("operation not permitted", _NOT_WRITABLE),
    errno.EIO: ("input/output error", "check the disk"),
}
_NEARLY_FULL = 1 << 20  # bytes
# What a failed save raises: its own errors, and DCP's wrapper of any rank's.
SAVE_ERRORS = (Exception, CheckpointException)


class CheckpointWriteError(ShardwiseError):
    """The disk refused a checkpoint; earlier checkpoints are untouched and none is half-written."""


def disk_failure(exc: BaseException, final: Path) -> str | None:
    """The one-line message for a disk problem anywhere in `exc`'s chain; None if it is not one."""
    directory = final.parent
    found = _os_error(exc)
    code = found.errno if found is not None else _full_or_read_only(directory)
    if code is None:
        return None
    reason, fix = _DISK_ERRORS[code]
    run_dir = directory.parent if directory.name == "checkpoints" else directory
    newest = latest_checkpoint(directory)
    if newest is None:
        intact, then = "none was saved before", f"start again with --overwrite in {run_dir}"
    else:
        intact, then = f"the newest is {newest.name}", f"--resume {run_dir}"
    where = f" ({found.filename})" if found is not None and found.filename else ""
    return (
        f"{directory}: {reason} writing checkpoint {final.name}{where}; earlier checkpoints are "
        f"intact ({intact}): {fix}, then {then}"
    )


def run_agreed(
    action: Callable[[], None] | None,
    final: Path,
    env: DistEnv,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Run `action` here (None: nothing to do on this rank), then settle every rank's outcome."""
    failed = None
    if action is not None:
        try:
            action()
        except SAVE_ERRORS as exc:
            failed = exc
    settle(failed, final, env, group)


def settle(
    failed: BaseException | None,
    final: Path,
    env: DistEnv,
    group: dist.ProcessGroup | None = None,
    payload: object = None,
) -> list:
    """Swap outcomes (and `payload`) with every rank; every rank raises if any rank failed.

    A disk problem is raised as CheckpointWriteError with the first failing rank's message; a
    bug is raised as itself on the rank that hit it (others report that rank failed).
    """
    report = None
    if failed is not None:
        described = disk_failure(failed, final)
        report = described or f"rank {env.rank} failed writing checkpoint {final.name}: " + (
            first_line(failed, with_type=True)
        )
    shared = agree({"error": report, "payload": payload}, env, group)
    if failed is not None and disk_failure(failed, final) is None:
        raise failed
    errors = [part["error"] for part in shared if part["error"]]
    if errors:
        raise CheckpointWriteError(errors[0])
    return [part["payload"] for part in shared]


def agree(value: object, env: DistEnv, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's `value` on every rank, indexed by rank in `group` (a few small objects)."""
    if not env.distributed:
        return [value]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _full_or_read_only(directory: Path) -> int | None:
    """ENOSPC or EROFS if the filesystem under `directory` says so now, else None.

    Not every writer passes the disk's answer on: torch.save's zip writer reports a short write
    as "RuntimeError: ... unexpected pos 704 vs 598". A failed save on a filesystem that is
    read-only, or has less than `_NEARLY_FULL` bytes left, is taken to be that disk's doing.
    """
    try:
        stats = os.statvfs(directory if directory.exists() else directory.parent)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return errno.EROFS
    return errno.ENOSPC if stats.f_bavail * stats.f_frsize < _NEARLY_FULL else None


def _os_error(exc: BaseException | None, depth: int = 0) -> OSError | None:
    if exc is None or depth > 8:
        return None
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
        return exc
    if "No space left on device" in str(exc) or "unexpected pos" in str(exc):
        # Writers that drop the errno (torch.save's zip writer: a short write) still say it.
        return OSError(errno.ENOSPC, "No space left on device")
    if isinstance(exc, CheckpointException):  # DCP wraps each failing rank's own error
        for wrapped, _ in exc.failures.values():
            found = _os_error(wrapped, depth + 1)
            if found is not None:
                return found
    return _os_error(exc.__cause__ or exc.__context__, depth + 1)
