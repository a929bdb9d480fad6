"""Find the checkpoint to resume from: the newest one that verifies.

    path, notes = agree_on_checkpoint(Path("runs/x"), env)   # same verified path on every rank
    notes   # ["step_00000040 skipped: __0_0.distcp does not match its digest ..."]

Given a run directory, checkpoints are tried newest first and any that fails verification is
skipped with a note saying why. Given a checkpoint directory, that one is used or refused:
the user named it, so nothing else is silently taken instead.
"""

from __future__ import annotations

from pathlib import Path

from shardwise.checkpoint.errors import CheckpointRejected
from shardwise.checkpoint.listing import NAME, candidates, latest_checkpoint
from shardwise.checkpoint.load import verify_checkpoint
from shardwise.checkpoint.manifest import MANIFEST_FILE
from shardwise.checkpoint.state import STATE_FILE, TrainerState
from shardwise.distributed import DistEnv, broadcast_object
from shardwise.errors import ShardwiseError

__all__ = [
    "agree_on_checkpoint",
    "candidates",
    "choose_checkpoint",
    "find_checkpoint",
    "is_checkpoint_dir",
    "latest_checkpoint",
]


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` looks like one checkpoint rather than a run directory."""
    return (
        bool(NAME.match(path.name))
        or (path / MANIFEST_FILE).is_file()
        or (path / STATE_FILE).is_file()
    )


def find_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the latest sealed one in a run directory."""
    if is_checkpoint_dir(path):
        return path
    found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
    if found is None:
        raise ShardwiseError(
            f"--resume {path}: no complete checkpoint there; pass a run directory or a "
            "checkpoints/step_XXXXXXXX directory"
        )
    return found


def choose_checkpoint(path: Path) -> tuple[Path, TrainerState, list[str]]:
    """The verified checkpoint `--resume path` means, its state, and notes on any skipped."""
    if is_checkpoint_dir(path):
        if not path.is_dir():
            raise ShardwiseError(f"--resume {path}: no such checkpoint directory")
        return path, verify_checkpoint(path), []
    notes: list[str] = []
    for candidate in candidates(path / "checkpoints") or candidates(path):
        try:
            return candidate, verify_checkpoint(candidate), notes
        except CheckpointRejected as exc:
            notes.append(f"{candidate.name} skipped: {exc.reason}")
    reason = f" ({notes[-1]})" if notes else ""
    raise ShardwiseError(f"--resume {path}: no checkpoint there verifies{reason}")


def agree_on_checkpoint(wanted: Path, env: DistEnv) -> tuple[Path, list[str]]:
    """Rank 0 verifies and chooses; every rank gets the same path (or the same error)."""
    verdict: dict[str, object] = {}
    if env.is_main:
        try:
            path, _, notes = choose_checkpoint(wanted)
            verdict = {"path": str(path), "notes": notes}
        except ShardwiseError as exc:
            verdict = {"error": str(exc)}
    verdict = dict(broadcast_object(verdict, env))  # type: ignore[arg-type]
    if "error" in verdict:
        raise ShardwiseError(str(verdict["error"]))
    return Path(str(verdict["path"])), list(verdict["notes"])  # type: ignore[arg-type]
