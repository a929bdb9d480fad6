"""Find the checkpoint to resume from: the newest one that verifies, and loads.

    path, result, notes = load_newest(Path("runs/x"), env, attempt)   # the same on every rank
    notes   # ["step_00000040 skipped: __0_0.distcp does not match its digest ..."]

Given a run directory, checkpoints are tried newest first and any that fails is skipped with a
note saying why. Given a checkpoint directory, that one is used or refused: the user named it,
so nothing else is silently taken instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from shardwise.checkpoint.agreement import REFUSED, UNEXPECTED, Failure, Ranks, attempt
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
    "load_newest",
]

T = TypeVar("T")


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
    """The verified checkpoint `--resume path` means, its state, and notes on any skipped.

    In this process alone: nothing is loaded, nothing is asked of other ranks.
    """
    return _newest(path, Ranks(None), lambda _, state: state)


def load_newest(
    wanted: Path, env: DistEnv, load: Callable[[Path, TrainerState], T]
) -> tuple[Path, T, list[str]]:
    """The newest checkpoint `--resume wanted` means that verifies and that `load` takes.

        path, state, notes = load_newest(run_dir, env, lambda path, state: load_it(path))

    Every rank calls it alike. Rank 0 verifies each candidate; every rank then runs
    `load(path, its verified state)` - its own checks, then the load. Whatever fails on any
    rank, while verifying or loading, skips that checkpoint on every rank with one note, and
    the next older one is tried; but a ShardwiseError that is not a refusal of the checkpoint
    (this run's settings do not fit it) ends the resume at once, since an older one of the same
    run would not fit either. If none is left and a failure was not one anybody anticipated,
    it is raised as itself: that is more likely our bug than every checkpoint's fault.
    """
    return _newest(wanted, Ranks(env), load)


def _newest(
    wanted: Path, ranks: Ranks, load: Callable[[Path, TrainerState], T]
) -> tuple[Path, T, list[str]]:
    named = is_checkpoint_dir(wanted)
    if named and not wanted.is_dir():
        raise ShardwiseError(f"--resume {wanted}: no such checkpoint directory")
    listed = [wanted] if named else candidates(wanted / "checkpoints") or candidates(wanted)
    shared = ranks.share([str(path) for path in listed])
    notes: list[str] = []
    unexpected: Exception | None = None
    for path in map(Path, shared):  # type: ignore[call-overload]  # rank 0's list of str
        result, first, error = _try(path, ranks, load)
        if first is None:
            return path, result, notes  # type: ignore[return-value]  # None only on failure
        own = error if first["rank"] == ranks.rank else None  # raised as itself where it was
        if first["kind"] == REFUSED:
            raise own or ShardwiseError(first["line"])
        if named:
            raise own or CheckpointRejected(path, first["line"])
        if first["kind"] == UNEXPECTED:
            unexpected = unexpected or own
        notes.append(f"{path.name} skipped: {first['line']}")
    if unexpected is not None:
        raise unexpected
    reason = f" ({notes[-1]})" if notes else ""
    raise ShardwiseError(f"--resume {wanted}: no checkpoint there verifies{reason}")


def _try(
    path: Path, ranks: Ranks, load: Callable[[Path, TrainerState], T]
) -> tuple[T | None, Failure | None, Exception | None]:
    """Rank 0 verifies `path`, then every rank loads the state it read; the first failure."""
    state, failure, error = None, None, None
    if ranks.rank == 0:
        state, failure, error = attempt(lambda: verify_checkpoint(path), ranks.rank)
    text = state.to_json() if state is not None else None
    verdict: dict = ranks.share({"state": text, "failure": failure})  # type: ignore[assignment]
    if verdict["failure"] is not None:
        return None, verdict["failure"], error
    saved = TrainerState.from_json(verdict["state"])
    result, failure, error = attempt(lambda: load(path, saved), ranks.rank)
    return result, ranks.first_failure(failure), error


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
