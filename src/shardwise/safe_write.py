"""Replacing a file whole without ever writing through a symbolic link at its name.

    replace_file(run_dir / "summary.json", json.dumps(summary))
    replace_file(run_dir / "loss.png", png_bytes)   # a link named loss.png goes; its target stays

A run dir may come from someone else, links included; every file shardwise replaces there goes
through here. Files written in place (appended to, or locked) cannot be replaced like this:
those open with O_NOFOLLOW and refuse a link (see run_dir.py).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from shardwise.checkpoint.files import fsync_directory

# O_EXCL: the temporary name is created here or not at all (never an existing file or link);
# O_NOFOLLOW: even a link at that name is refused rather than followed.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def replace_file(path: Path, data: bytes | str) -> Path:
    """Replace `path` with `data` atomically and durably, never through a link; returns `path`.

        replace_file(Path("runs/a/summary.json"), '{"steps": 3}')   # str is written as UTF-8
        replace_file(Path("runs/a/model.safetensors"), raw_bytes)

    The data goes to a new file beside `path` (a rename is atomic only within one filesystem),
    reaches the disk, then takes the name: the rename replaces whatever entry is there, a link
    included, and never touches what a link points to. Readers see the old file or the new.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, _NEW_FILE, 0o644)  # the umask applies, as for open()
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path
