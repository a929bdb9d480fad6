"""The one exception type for mistakes a user can make.

    raise ShardwiseError("--data runs/x.txt: file not found; pass an existing text or JSONL file")

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class ShardwiseError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages can run to pages)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
