"""Every rank's outcome of one step of a load, so that all go on, skip or stop alike.

    ranks = Ranks(env)                                     # Ranks(None): this process alone
    result, failure, error = attempt(lambda: load(path), ranks.rank)
    first = ranks.first_failure(failure)                   # the same on every rank

Loading is collective: a rank that gives up alone leaves the others waiting in DCP's next
collective until it times out, and a resume that skips a checkpoint on one rank only would
train on two. So ranks swap outcomes and act on one: the failure of the lowest rank that failed.
A failure is a line and its kind: the checkpoint was refused (`CheckpointRejected`), this run
cannot use it (any other ShardwiseError), or something nobody anticipated raised.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from shardwise.checkpoint.errors import CheckpointRejected
from shardwise.distributed import DistEnv, all_gather_objects, broadcast_object
from shardwise.errors import ShardwiseError, first_line

T = TypeVar("T")
Failure = dict  # {"rank": int, "kind": REJECTED | REFUSED | UNEXPECTED, "line": str}: JSON

REJECTED, REFUSED, UNEXPECTED = "rejected", "refused", "unexpected"


def attempt(
    action: Callable[[], T], rank: int
) -> tuple[T | None, Failure | None, Exception | None]:
    """Run `action`: (its result, None, None), or (None, the failure as a line, the error)."""
    try:
        return action(), None, None
    except Exception as exc:  # classified, then swapped and acted on by every rank
        return None, failure_of(exc, rank), exc


def failure_of(exc: Exception, rank: int) -> Failure:
    if isinstance(exc, CheckpointRejected):
        kind, line = REJECTED, exc.reason
    elif isinstance(exc, ShardwiseError):
        kind, line = REFUSED, str(exc)
    else:
        kind, line = UNEXPECTED, first_line(exc, with_type=True)
    return {"rank": rank, "kind": kind, "line": line}


class Ranks:
    """The ranks that decide together: `env`'s, or (None) this process alone."""

    def __init__(self, env: DistEnv | None) -> None:
        self.env = env

    @property
    def rank(self) -> int:
        return self.env.rank if self.env is not None else 0

    def share(self, value: object) -> object:
        """Rank 0's JSON `value` on every rank."""
        return value if self.env is None else broadcast_object(value, self.env)

    def first_failure(self, failure: Failure | None) -> Failure | None:
        """The lowest failing rank's failure, from every rank's `failure` (None: none failed)."""
        failures = [found for found in self._gathered(failure) if found]
        return min(failures, key=lambda found: found["rank"]) if failures else None

    def settle(self, failure: Failure | None, error: Exception | None, path: Path) -> None:
        """Return if no rank failed; else raise on every rank alike.

        The rank that failed raises its own error (a bug stays its traceback); the others raise
        the first failure as a refusal of checkpoint `path` or, for a ShardwiseError, as its line.
        """
        first = self.first_failure(failure)
        if error is not None:
            raise error
        if first is None:
            return
        if first["kind"] == REFUSED:
            raise ShardwiseError(first["line"])
        if first["kind"] == REJECTED:
            raise CheckpointRejected(path, first["line"])
        raise CheckpointRejected(path, f"rank {first['rank']}: {first['line']}")

    def _gathered(self, value: object) -> list:
        if self.env is None:
            return [value]
        return all_gather_objects(value, self.env)
