"""`--keep-checkpoints K`: delete old checkpoints once a newer one is whole.

    prune(run_dir / "checkpoints" / "step_00000300", Retention(keep=3, protect=resume_path))

Only sealed `step_XXXXXXXX` directories older than the one just sealed are candidates, and the
K - 1 newest of them stay beside it. Never deleted: the checkpoint just sealed (the newest
complete one), the one `--resume` named, and any with a higher step than the one just sealed
(left by an earlier branch of this run: not ours to judge). A checkpoint is first renamed to
`.deleting` (one atomic step, after which nothing resumes from it), then removed, so a crash
mid-delete never leaves a half-deleted checkpoint under a name `--resume` would try.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shardwise.checkpoint.files import fsync_directory, remove_tree
from shardwise.checkpoint.listing import DELETING_SUFFIX, candidates, step_of
from shardwise.checkpoint.manifest import is_sealed


@dataclass(frozen=True)
class Retention:
    """How many checkpoints to keep (0: all), and one that must stay whatever the count."""

    keep: int = 0
    protect: Path | None = None


def prune(newest: Path, retention: Retention) -> list[Path]:
    """Delete what `retention` does not keep beside `newest` (just sealed); returns them."""
    directory = newest.parent
    for stale in directory.glob(f"step_*{DELETING_SUFFIX}"):  # a delete cut short
        remove_tree(stale, ignore_errors=True)
    if retention.keep <= 0:
        return []
    protected = {newest.resolve()}
    if retention.protect is not None:
        protected.add(Path(retention.protect).resolve())
    older = [
        path
        for path in candidates(directory)
        if step_of(path) < step_of(newest) and is_sealed(path)
    ]
    doomed = [path for path in older[retention.keep - 1 :] if path.resolve() not in protected]
    for path in doomed:
        aside = path.with_name(path.name + DELETING_SUFFIX)
        path.rename(aside)  # a linked checkpoint: the link moves, and goes; its target stays
        fsync_directory(directory)
        remove_tree(aside)
    return doomed
