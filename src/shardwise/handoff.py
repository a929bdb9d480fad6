"""What the launcher (agent.py) and its workers (train/worker.py) tell each other: files, exit
statuses and signals, in the launcher's temporary folder, which outlives every attempt.

    write_record(folder, ERROR_FILE, {"message": line, "peer_lost": False})   # a worker
    summary = rank_zero_summary(folder)                                         # the launcher

Both sides import this module and nothing of each other, so that the launcher loads no training
code: each attempt's notes go under `attempt<N>/`, the agent's own logs under `agent/`.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

# The folder's layout.
ATTEMPT_DIR = "attempt{attempt}"
AGENT_LOGS = "agent"  # where the launcher points the agent's per-worker logs and error files
SYS_PATH_FILE = "sys_path.json"  # the launcher's sys.path, for a worker started with -P
LAUNCHED_FILE = "launched_at.txt"  # when the launcher started, restarts included
LAUNCHER_SUMMARY_FILE = "summary-rank{rank}.json"  # a command returns nothing through the agent
ERROR_FILE = "error-rank{rank}.txt"  # a user error or lost peer: {"message", "peer_lost"}
ERROR_FILE_GLOB = "error-rank*.txt"
PREEMPT_FILE = "preempting"  # the launcher's word that its SIGTERM is a preemption
PREEMPTED_FILE = "preempted-rank{rank}.json"  # the step and checkpoint a preempted rank saved
PID_FILE_GLOB = "worker-*.pid"  # each worker's, for the launcher's abort at a second Ctrl-C
LAUNCHER_PID_ENV = "SHARDWISE_LAUNCHER_PID"  # workers die with this process

# What a worker with a user error sends its launcher: retrying cannot cure that, so the launcher
# stops the group at once rather than let the agent restart it.
GIVE_UP_SIGNAL = signal.SIGUSR1
# Exit statuses of `shardwise train` (the README's "Exit status" table).
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped with a checkpoint; --resume continues
EXIT_INTERRUPTED = 130  # 128 + SIGINT: aborted (a second Ctrl-C), nothing saved just now
EXIT_STOPPED = 128 + signal.SIGTERM  # a worker the agent stopped: what SIGTERM's death reports


class Preempted(BaseException):  # a way for a run to end, not an error
    """The run stopped on a signal after `step`; `checkpoint` holds it (None: nothing saved).

    raise Preempted(37, Path("runs/a/checkpoints/step_00000037"), "SIGTERM")

    A BaseException, as KeyboardInterrupt is: raised from a signal handler, it may land in any
    code, and an `except Exception` meant for that code's own failures (a probe that tries a
    model several ways) must not take the stop for one of them.
    """

    def __init__(
        self,
        step: int | None,
        checkpoint: Path | None,
        signal_name: str,
        resume_from: Path | None = None,
    ) -> None:
        self.step = step
        self.checkpoint = checkpoint
        self.signal_name = signal_name
        self.resume_from = resume_from  # without a checkpoint now: a run dir with an earlier one
        super().__init__(self.describe())

    @property
    def exit_status(self) -> int:
        """75 with a checkpoint; else 128 + the signal's number, as a shell reports a kill."""
        if self.checkpoint is not None:
            return EXIT_PREEMPTED
        number = getattr(signal.Signals, self.signal_name, signal.SIGTERM)
        return 128 + int(number)

    def describe(self) -> str:
        if self.checkpoint is None:
            resume = f"; continue from its newest checkpoint with --resume {self.resume_from}"
            return f"stopped by {self.signal_name} before a checkpoint was saved" + (
                resume if self.resume_from else ""
            )
        run_dir = self.checkpoint.parent.parent
        return (
            f"preempted at step {self.step} ({self.signal_name}); checkpoint saved to "
            f"{self.checkpoint}; continue with --resume {run_dir}"
        )


def attempt_dir(folder: Path, attempt: int | None = None) -> Path:
    """Where attempt `attempt` (default: this one) leaves its notes; created on first use."""
    from shardwise.distributed import attempt_number  # torch: not for the CLI's --help

    number = attempt_number() if attempt is None else attempt
    path = folder / ATTEMPT_DIR.format(attempt=number)
    path.mkdir(parents=True, exist_ok=True)
    return path


def latest_attempt(folder: Path) -> int:
    """The launcher's last attempt so far: the number of restarts it took.

    Counted from our notes and from the agent's own per-attempt log folders
    (agent/<run_id>/attempt_N/), which exist even for an attempt that died before any note.
    """
    ours = [path.name.removeprefix("attempt") for path in folder.glob("attempt*")]
    agents = [
        path.name.removeprefix("attempt_") for path in folder.glob(f"{AGENT_LOGS}/*/attempt_*")
    ]
    return max((int(n) for n in ours + agents if n.isdigit()), default=0)


def write_record(folder: Path, name: str, payload: dict) -> None:
    """This rank's note `name` ('kind-rank{rank}.json') for this attempt."""
    path = attempt_dir(folder) / name.format(rank=os.environ.get("RANK", "0"))
    # Whole or absent: the launcher may read the folder while another rank is still writing.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(payload), encoding="utf-8")
    partial.replace(path)


def write_rank_summary(folder: Path, text: str) -> None:
    """This rank's summary (JSON text), left for the launcher once the worker is done."""
    rank = os.environ.get("RANK", "0")
    Path(folder, LAUNCHER_SUMMARY_FILE.format(rank=rank)).write_text(text, encoding="utf-8")


def rank_zero_summary(folder: Path) -> dict | None:
    """Rank 0's summary, if rank 0 ran on this node and finished."""
    rank_zero = folder / LAUNCHER_SUMMARY_FILE.format(rank=0)
    return json.loads(rank_zero.read_text(encoding="utf-8")) if rank_zero.exists() else None
