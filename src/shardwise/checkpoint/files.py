"""Filesystem steps that survive a crash at any instant: the one home of durable writes.

    write_durably(path, text)          # on disk before it returns (a file nobody reads yet)
    replace_directory(new, final)      # `final` is always one whole checkpoint or the other
    remove_tree(path)                  # a folder and all in it; a link as a link

Checkpoints use them; the run's own files are replaced by shardwise.safe_write. Nothing here
deletes or writes through a symbolic link: a link where a checkpoint goes is replaced itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import stat
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
OLD_SUFFIX = ".old"


def write_durably(path: Path, text: str) -> None:
    """Write `text` to `path` and flush it to the disk."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_directory(new: Path, final: Path) -> None:
    """Move directory `new` to `final`, replacing what is there without a gap.

    Linux swaps the two names in one step (renameat2 RENAME_EXCHANGE). Where the filesystem
    cannot, the old directory moves aside to `<final>.old` first and is removed last; a reader
    that finds no `final` falls back to that `.old` copy (see `find.candidates`).
    """
    if not os.path.lexists(final):  # a dangling link is still an entry to replace
        os.replace(new, final)
    elif _exchange(new, final):
        remove_tree(new)  # now holds the old checkpoint (or a link that stood there)
    else:
        aside = final.with_name(final.name + OLD_SUFFIX)
        remove_tree(aside, ignore_errors=True)
        os.replace(final, aside)
        fsync_directory(final.parent)
        os.replace(new, final)
        fsync_directory(final.parent)
        remove_tree(aside)
    fsync_directory(final.parent)


def remove_tree(path: Path, ignore_errors: bool = False) -> None:
    """Delete folder `path` and all in it, or a file or link `path` itself; absent: nothing.

        remove_tree(checkpoints / "step_00000100.partial")   # a link there: only the link goes

    Never follows a link: shutil.rmtree refuses one at the top (and unlinks those inside).
    """
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        if not ignore_errors:
            raise


def _exchange(a: Path, b: Path) -> bool:
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc else None
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None
