"""`python -m shardwise` is the `shardwise` command (and what `torchrun -m shardwise` runs).

`python -m` puts the working directory first on sys.path, ahead of the installed packages, so a
rich.py or tensorboard.py lying there would be imported in place of the library, here and in
every spawned worker (they inherit sys.path). That entry is dropped before the CLI imports
anything more. What shardwise/__init__.py needed to get this far (pydantic, tomli_w: no torch)
was already imported through it; `python -P -m shardwise` avoids even that.
"""

import os
import sys
from pathlib import Path

import shardwise


def _drop_working_directory() -> None:
    cwd = os.getcwd()
    if sys.flags.safe_path or not sys.path or sys.path[0] != cwd:
        return
    # Run from an uninstalled source tree (cd src; python -m shardwise), the entry is how
    # shardwise itself, and so each spawned worker, finds the package: it stays.
    if Path(shardwise.__file__).resolve().parent.parent == Path(cwd).resolve():
        return
    del sys.path[0]


_drop_working_directory()

from shardwise.cli import main  # noqa: E402  (only once the working directory is off the path)

raise SystemExit(main())
