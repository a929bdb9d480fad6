"""The one exception type for mistakes a user can make, and the one way to shorten others.

    raise ShardwiseError("--data runs/x.txt: file not found; pass an existing text or JSONL file")

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys


class ShardwiseError(Exception):
    """A problem with the user's input or environment, with a message that names the fix.

        raise ShardwiseError("model 'm:f': the factory raised ...", shown_traceback=text)

    `shown_traceback`, when the user's own code raised, is where in it: the CLI prints it once
    above the line.
    """

    shown_traceback: str = ""

    def __init__(self, *args: object, shown_traceback: str = "") -> None:
        super().__init__(*args)
        self.shown_traceback = shown_traceback


class WorkerFailedError(ShardwiseError):
    """A worker raised something that is not a ShardwiseError: a bug, ours or in a user's model.

        raise WorkerFailedError("worker rank 1 failed: TypeError: ...", worker_traceback=text)

    The message is the root cause in one line; `worker_traceback` is the worker's own traceback,
    which the CLI prints once above that line (the worker itself printed nothing).
    """

    def __init__(self, message: str, worker_traceback: str = "") -> None:
        super().__init__(message, shown_traceback=worker_traceback)
        self.worker_traceback = worker_traceback


def print_error(error: ShardwiseError) -> None:
    """A user's mistake as the CLI and an own-loop script end on it: the traceback of the user's
    own code that raised (if any) once, then the one line.

        print_error(ShardwiseError("--data x: file not found"))   # shardwise: error: --data x: ...
    """
    if error.shown_traceback:  # a worker's bug or the user's own code, which nobody printed yet
        print(error.shown_traceback.rstrip(), file=sys.stderr)
    print(f"shardwise: error: {error}", file=sys.stderr, flush=True)


def first_line(error: BaseException | str, *, with_type: bool = False, whole: bool = False) -> str:
    """The first non-blank line of an error's message (libraries' messages can run to pages).

        first_line(RuntimeError("size mismatch\\n  at ..."))         # 'size mismatch'
        first_line(ValueError("bad\\nwidth"), with_type=True, whole=True)  # 'ValueError: bad width'

    `whole` joins every line instead, for short messages a user's own code wrote. An exception
    without a message is named by its type.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines) if whole else (lines[0] if lines else "")
    if isinstance(error, str):
        return text
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text}" if with_type else text
