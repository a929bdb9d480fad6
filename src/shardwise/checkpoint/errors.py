"""Why a checkpoint is not used.

raise CheckpointRejected(path, "__0_0.distcp does not match its digest")
"""

from __future__ import annotations

from pathlib import Path

from shardwise.errors import ShardwiseError


class CheckpointRejected(ShardwiseError):
    """A checkpoint that is incomplete, corrupted, edited or unsafe: never loaded.

    A run directory's resume falls back past these to the newest checkpoint that verifies.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"checkpoint {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple:
        # DCP swaps each rank's error between ranks by pickling it: rebuild from both fields.
        return (type(self), (self.path, self.reason))


def describe(exc: BaseException) -> str:
    """One line for a parse or validation error: where, and what was wrong."""
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic: the first problem, located
        found = errors()
        # A value that fits no member of a union fails once per member: the one that is not
        # merely "not of my type" says what is wrong with it (NaN: "a finite number").
        first = next((e for e in found if not e["type"].endswith("_type")), found[0])
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        return f"{where}: {first['msg']}"
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
