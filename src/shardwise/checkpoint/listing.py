"""Which checkpoint directories a folder holds, newest first (names only, nothing verified).

    candidates(run_dir / "checkpoints")         # [.../step_00000040, .../step_00000020]
    latest_checkpoint(run_dir / "checkpoints")  # the newest with a manifest, or None
    check_no_links(run_dir)                     # before training: no link where one is written

Only `step_XXXXXXXX` (and a `.old` copy, see `files.replace_directory`) count: a `.partial`
save still being written, or cut short, never does.
"""

from __future__ import annotations

import re
from pathlib import Path

from shardwise.checkpoint.files import OLD_SUFFIX
from shardwise.checkpoint.manifest import is_sealed
from shardwise.errors import ShardwiseError

PARTIAL_SUFFIX = ".partial"  # a save being written (save.py)
DELETING_SUFFIX = ".deleting"  # a checkpoint being deleted (retention.py)
NAME = re.compile(rf"^step_(\d{{8}})({re.escape(OLD_SUFFIX)})?$")
# Every name a save, a replace or a delete writes, renames or removes in a checkpoints folder.
_SUFFIXES = "|".join(map(re.escape, (PARTIAL_SUFFIX, OLD_SUFFIX, DELETING_SUFFIX)))
WRITTEN = re.compile(rf"^step_\d{{8}}({_SUFFIXES})?$")


def candidates(directory: Path) -> list[Path]:
    """Checkpoint directories in `directory`, newest step first.

    A `step_X.old` copy (left by a replace that was cut short on a filesystem without atomic
    exchange) counts only where `step_X` itself is gone.
    """
    if not directory.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for child in directory.iterdir():
        match = NAME.match(child.name)
        if match and child.is_dir():
            step = int(match.group(1))
            if not match.group(2) or step not in by_step:
                by_step[step] = child
    return [by_step[step] for step in sorted(by_step, reverse=True)]


def latest_checkpoint(directory: Path) -> Path | None:
    """The sealed checkpoint with the highest step in `directory`, if any (not verified)."""
    return next((path for path in candidates(directory) if is_sealed(path)), None)


def step_of(path: Path) -> int:
    """100 for `.../step_00000100` (or its `.old` copy)."""
    match = NAME.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory name")
    return int(match.group(1))


def check_no_links(run_dir: Path) -> None:
    """Refuse, in one line, a symbolic link where this run writes or deletes a checkpoint.

        check_no_links(Path("runs/a"))   # ShardwiseError if checkpoints/step_00000100 is a link

    Such a link is never written through anyway (a save replaces it, a delete unlinks it, a
    resume skips it), but whoever planted it expected something else, so a run is refused
    before training rather than surprise them after. The `checkpoints` folder itself may be a
    link (to another disk): writing there is what it asks for.
    """
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        if WRITTEN.match(entry.name) and entry.is_symlink():
            raise ShardwiseError(
                f"{entry} is a symbolic link where shardwise writes checkpoints, and it never "
                "writes through one: delete the link (what it points to stays) or choose "
                "another --run-dir"
            )
