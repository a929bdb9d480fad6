"""An asynchronous worker that dies leaves the run; the run goes on without it.

    if supervises(config):           # in the worker command, before anything else
        sys.exit(supervise(argv))    # runs the same command as a child, and outlives it

The elastic agent ends the whole group when any process it started fails, which is right for
synchronous training (the others would wait for the dead one) and wrong for asynchronous
workers, who wait for nobody. So an asynchronous worker other than rank 0 (which writes the
run's report) runs under a small supervising parent, the process the agent watches. When the
worker dies of a signal it was not sent through the supervisor (SIGKILL by the kernel's OOM
killer or an operator, a crash in native code, the heartbeat's kill of a hung worker), the
supervisor marks it as left in the job's store, where the other workers' meetings skip it,
says so in one line and exits 0. The servers have already noticed: the worker's links broke.
Any other ending is passed on as it is: an error is still the run's error, and SIGTERM or
Ctrl-C (forwarded to the worker) still stops it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

from shardwise import techniques
from shardwise.config import TrainConfig
from shardwise.distributed import job_store
from shardwise.handoff import GIVE_UP_SIGNAL, LAUNCHER_PID_ENV
from shardwise.parallel.sync.meeting import mark_left
from shardwise.parallel.sync.ps_links import meeting_store
from shardwise.train.heartbeat import mark_done

SUPERVISED_ENV = "SHARDWISE_SUPERVISED"
_PR_SET_PDEATHSIG = 1
_EXIT_ORPHANED = 3


def supervises(config: TrainConfig) -> bool:
    """Whether this process is to supervise its worker: an expendable one, not yet supervised."""
    rank = int(os.environ.get("RANK", "0"))
    return rank in expendable_ranks(config) and not os.environ.get(SUPERVISED_ENV)


def expendable_ranks(config: TrainConfig) -> frozenset[int]:
    """The ranks this job goes on without (techniques/: their `Beside.expendable`)."""
    return techniques.expendable_ranks(config, int(os.environ.get("WORLD_SIZE", "1")))


def supervise(argv: list[str]) -> int:
    """Run `argv` as the worker, forward SIGTERM and SIGINT to it and its give-up signal to the
    launcher; its exit status, or 0 when it died of a signal nobody forwarded (it left)."""
    child = subprocess.Popen(
        argv,
        env={**os.environ, SUPERVISED_ENV: "1", LAUNCHER_PID_ENV: str(os.getpid())},
        preexec_fn=die_with_parent,
    )
    forwarded: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        forwarded.append(signum)
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    # A worker's word that it failed on a user error goes to its parent, meant for the launcher
    # (worker.py): passed up, as if the worker were the agent's child itself.
    signal.signal(GIVE_UP_SIGNAL, lambda *_: os.kill(os.getppid(), GIVE_UP_SIGNAL))
    status = child.wait()
    if status >= 0 or -status in forwarded:
        return status if status >= 0 else 128 - status
    _leave(signal.Signals(-status).name)
    return 0


def _leave(why: str) -> None:
    rank = int(os.environ["RANK"])
    mark_left(meeting_store(), rank, f"died of {why}")
    mark_done(job_store("heartbeat"), rank)
    print(
        f"shardwise: worker rank {rank} died ({why}); the asynchronous run goes on without it",
        file=sys.stderr,
        flush=True,
    )


def die_with_parent(parent: int | None = None) -> None:
    """This process gets SIGKILL when its parent dies (Linux); it exits at once if that happened.

        die_with_parent(launcher_pid)   # first thing in a worker: never outlive the launcher

    `parent`: the pid the parent must have; else a parent already gone shows as init (pid 1).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # It may have died before the line above: then no signal comes, and our parent is another.
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):
        os._exit(_EXIT_ORPHANED)
