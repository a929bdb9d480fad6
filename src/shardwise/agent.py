"""Start the workers of a run through torch.distributed.run's elastic agent.

    summary = launch_workers(config, nproc=2)   # rank 0's summary once every worker is done
    loss = launch(train, 2, "lstm")              # rank 0's return of train("lstm"), your own loop

The agent does what `torchrun` does (c10d rendezvous, worker monitoring, teardown of the rest
when one dies); we call it programmatically so `shardwise train` needs no wrapper script. A
worker that fails on a user mistake leaves its one-line message in a file for the launcher to
print. Any other exception is written to the worker's error file by torch's `@record` (around
the worker command's `main`, or the agent's own around a function; TORCHELASTIC_ERROR_FILE);
the launcher raises it as a `WorkerFailedError` carrying the worker's type, message and
traceback, so the root cause reaches the user exactly once.

A failed worker group is restarted by the agent up to --max-restarts times (the workers resume
by themselves: train/restarts.py); a user error is not retried. SIGTERM and the first Ctrl-C
are the launcher's: it tells the workers it is a preemption and lets the agent pass SIGTERM on,
waiting up to --preempt-grace-s for their checkpoint; a second Ctrl-C kills them at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TypeVar

import torch
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous import RendezvousError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from shardwise.checkpoint import latest_checkpoint
from shardwise.config import TrainConfig
from shardwise.distributed import ATTEMPT_ENV
from shardwise.errors import ShardwiseError, WorkerFailedError, first_line
from shardwise.handoff import (
    AGENT_LOGS,
    ATTEMPT_DIR,
    ERROR_FILE_GLOB,
    EXIT_STOPPED,
    GIVE_UP_SIGNAL,
    LAUNCHED_FILE,
    LAUNCHER_PID_ENV,
    PID_FILE_GLOB,
    PREEMPT_FILE,
    PREEMPTED_FILE,
    SYS_PATH_FILE,
    Preempted,
    latest_attempt,
    rank_zero_summary,
)
from shardwise.signed_store import job_secret_in_environment
from shardwise.stores import (
    bind_configs,
    free_port,
    loopback_comms,
    rendezvous_backend,
)

T = TypeVar("T")
_AGENT_LOGS = AGENT_LOGS
_ELASTIC_LAST_CALL_S = 5
_ELASTIC_KEEP_ALIVE_S = 2


def launch_workers(config: TrainConfig, nproc: int) -> dict | None:
    """Run `nproc` workers on this node (of `config.nnodes`); rank 0's summary, if it ran here.

    Each worker is the command `python -P -m shardwise.train.worker`, never a function: spawning
    a function re-imports the caller's script in every worker, so a script calling
    `shardwise.run(...)` without an `if __name__ == "__main__":` guard would start the run again
    in each of them. The job's store listens on loopback for one node, else on the endpoint's
    address only (see shardwise.stores). A node whose workers do not include rank 0 gets None.
    """
    # A given one-node endpoint's port was checked by the preflight, before anything started.
    endpoint = config.rdzv_endpoint or f"localhost:{free_port()}"
    launch_config = _launch_config(
        nproc,
        endpoint,
        nnodes=config.nnodes,
        min_nodes=config.min_nodes,
        node_rank=config.node_rank,
        join_s=config.timeout_s,
        max_restarts=config.max_restarts,
        grace_s=config.preempt_grace_s,
    )
    with (
        job_secret_in_environment(config.job_secret_file, config.nnodes),
        _agent(launch_config, config.nnodes) as folder,
        launcher_signals(folder),
    ):
        # -P: the working directory stays off the worker's path (see shardwise/__main__.py); the
        # worker then takes this process's sys.path from the folder, as a spawned one would.
        (folder / SYS_PATH_FILE).write_text(json.dumps(sys.path), encoding="utf-8")
        (folder / LAUNCHED_FILE).write_text(repr(time.time()), encoding="ascii")
        command = ("-P", "-m", "shardwise.train.worker", config.model_dump_json(), str(folder))
        try:
            elastic_launch(launch_config, sys.executable)(*command)
        except RendezvousError as exc:
            raise ShardwiseError(
                f"rendezvous at {endpoint}: the {config.min_nodes or config.nnodes} nodes did not "
                f"all join within "
                f"{config.timeout_s:g}s ({type(exc).__name__}); start `shardwise train` on every "
                "node with the same --nnodes and --rdzv-endpoint"
            ) from None
        except SignalException as exc:  # ours (see launcher_signals), or SIGHUP or SIGQUIT
            if rank_zero_summary(folder) is None:  # else it finished within the grace period
                raise stopped_run(folder, exc.sigval, config.run_dir) from None
        except GiveUp:
            raise _user_error(folder) from None
        # A command returns nothing through the agent: each worker left its summary here.
        summary = rank_zero_summary(folder)
        if summary is None:  # a node without rank 0, or workers stopped by a signal to them
            stop = stopped_run(folder, signal.SIGINT, config.run_dir)
            if stop.checkpoint is not None:
                raise stop
        return summary


def launch(fn: Callable[..., T], nproc: int, *args: object) -> T:
    """Run `fn(*args)` in `nproc` local worker processes; return rank 0's return value.

        def train(model_name):
            session = shardwise.setup()   # RANK, WORLD_SIZE, MASTER_ADDR... are set
            ...
            return final_loss

        loss = shardwise.launch(train, 2, "lstm")

    Workers start through torch's elastic agent as `shardwise train`'s do: torchrun's
    environment in each, a store on loopback only, and a worker that raises reaches the caller
    as a `WorkerFailedError` naming its exception (its traceback in `worker_traceback`). From a
    script, workers are spawned, which imports the script again in each of them: call `launch`
    under `if __name__ == "__main__":`, as with any multiprocessing script. In a notebook or
    REPL they are forked instead, so `fn` may be defined right there; that needs CUDA untouched
    in this process until then.
    """
    launch_config = _launch_config(nproc, f"localhost:{free_port()}", start_method=_start_method())
    with job_secret_in_environment(None, nnodes=1), _agent(launch_config, nnodes=1):
        return elastic_launch(launch_config, fn)(*args)[0]


# Signals: a preemption, a second Ctrl-C, a worker's user error (see train/preemption.py).


class GiveUp(Exception):
    """A worker reported a user error (GIVE_UP_SIGNAL): retrying cannot cure that."""


def launcher_signal_settings(grace_s: float) -> dict[str, object]:
    """LaunchConfig settings: SIGTERM and SIGINT are ours; stopped workers get `grace_s`."""
    # The agent would install its own SIGTERM and SIGINT handlers at every (re)start of the
    # workers, over ours; it keeps handling SIGHUP and SIGQUIT.
    return {"signals_to_handle": "SIGHUP,SIGQUIT", "shutdown_timeout": math.ceil(grace_s)}


@contextlib.contextmanager
def launcher_signals(folder: Path) -> Iterator[None]:
    """While the agent runs: SIGTERM and the first Ctrl-C preempt the run, a second Ctrl-C
    kills the workers at once (KeyboardInterrupt), and a worker's user error raises GiveUp.

    with launcher_signals(folder):
        elastic_launch(launch_config, sys.executable)(*command)   # SignalException: preempted

    A preemption leaves PREEMPT_FILE for the workers and raises the agent's own SignalException,
    on which the agent sends the workers SIGTERM and waits up to its shutdown timeout
    (--preempt-grace-s) before it kills them.
    """
    received: list[int] = []

    def on_stop(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) == 1:
            name = signal.Signals(signum).name
            (folder / PREEMPT_FILE).write_text(name, encoding="ascii")
            raise SignalException(f"shardwise got {name}", sigval=signal.SIGTERM)
        if signum == signal.SIGINT:  # a second Ctrl-C: abort; SIGTERM again changes nothing
            kill_workers(folder)
            raise KeyboardInterrupt

    def on_give_up(signum: int, frame: FrameType | None) -> None:
        raise GiveUp

    handlers = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop, GIVE_UP_SIGNAL: on_give_up}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def kill_workers(folder: Path) -> None:
    """SIGKILL every worker still running, with its data-loading processes (its group)."""
    for path in folder.glob(PID_FILE_GLOB):
        pid = int(path.stem.removeprefix("worker-"))
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:  # still a worker: each leads its own process group
                os.killpg(pid, signal.SIGKILL)


def stopped_run(folder: Path, signum: int, run_dir: Path | None) -> Preempted:
    """What a signal did to the run: the checkpoint the workers agreed on, or none.

    Every rank of a preempted group leaves a note with the step and checkpoint it saved.
    """
    word = folder / PREEMPT_FILE
    name = word.read_text(encoding="ascii") if word.exists() else signal.Signals(signum).name
    attempt = folder / ATTEMPT_DIR.format(attempt=latest_attempt(folder))
    for note in sorted(attempt.glob(PREEMPTED_FILE.format(rank="*"))):
        saved = json.loads(note.read_text(encoding="utf-8"))
        return Preempted(saved["step"], Path(saved["checkpoint"]), name)
    saved_before = run_dir is not None and latest_checkpoint(run_dir / "checkpoints")
    return Preempted(None, None, name, run_dir if saved_before else None)


def _start_method() -> str:
    """Spawn from a script; fork where `__main__` has no file to import again (a notebook)."""
    if getattr(sys.modules.get("__main__"), "__file__", None):
        return "spawn"
    if torch.cuda.is_initialized():
        raise ShardwiseError(
            "shardwise.launch: CUDA is already initialised in this process, and from a notebook "
            "or REPL workers can only be forked, which CUDA does not survive; call "
            "shardwise.launch before anything touches the GPU (restart the kernel)"
        )
    return "fork"


def _launch_config(
    nproc: int,
    endpoint: str,
    *,
    nnodes: int = 1,
    min_nodes: int | None = None,
    node_rank: int | None = None,
    join_s: float | None = None,
    start_method: str = "spawn",
    max_restarts: int = 0,
    grace_s: float | None = None,
) -> LaunchConfig:
    """The agent's settings for `nproc` workers here, of `nnodes` nodes meeting at `endpoint`.

    A given `node_rank` fixes this node's place (static rendezvous); else the rendezvous
    assigns it. With `min_nodes` below `nnodes` the job is elastic: a rendezvous closes with
    `min_nodes` or more once no other node joined for a few seconds, so the survivors of a lost
    node restart without it, and a node that arrives later makes the agents restart the group
    with it (that restart does not count against `max_restarts`). A failed group is restarted
    `max_restarts` times, then the run fails, reported by its root cause. With `grace_s`
    SIGTERM and SIGINT are left to the launcher (see launcher_signals), and a
    stopped worker gets that long before it is killed.
    """
    rdzv_configs: dict[str, object] = dict(bind_configs(endpoint, nnodes))
    if join_s is not None:
        rdzv_configs["join_timeout"] = int(join_s)
    if node_rank is not None:
        rdzv_configs["rank"] = node_rank
    if min_nodes is not None and min_nodes < nnodes:
        # The survivors of a lost node wait for it to be declared dead (no keep-alive for
        # interval x attempts; torch: 5 s x 3), then for more nodes to join (torch: 30 s).
        rdzv_configs["keep_alive_interval"] = _ELASTIC_KEEP_ALIVE_S
        rdzv_configs["keep_alive_max_attempt"] = 3
        rdzv_configs["last_call_timeout"] = _ELASTIC_LAST_CALL_S
    return LaunchConfig(
        min_nodes=min_nodes or nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        # Every node of a job must name the same run; one node's job needs no shared name.
        run_id="shardwise" if nnodes > 1 else uuid.uuid4().hex[:8],
        rdzv_backend=rendezvous_backend(static=node_rank is not None),
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs,
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method=start_method,
        **(launcher_signal_settings(grace_s) if grace_s is not None else {}),
    )


@contextlib.contextmanager
def _agent(launch_config: LaunchConfig, nnodes: int) -> Iterator[Path]:
    """While the agent runs: a temporary folder for the workers' reports (yielded), quiet agent
    logs and loopback sockets; a worker's failure leaves as the run's root cause."""
    _quiet_agent_logs()
    with (
        loopback_comms(nnodes),
        tempfile.TemporaryDirectory(prefix="shardwise-") as folder,
    ):
        # Workers die with this process (train/supervisor.die_with_parent), even of SIGKILL.
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        # The agent's per-worker error files (what `@record` writes) go into the same temporary
        # folder, so they are removed with it rather than left in /tmp/torchelastic_* per run.
        launch_config.logs_specs = DefaultLogsSpecs(log_dir=str(Path(folder, _AGENT_LOGS)))
        try:
            yield Path(folder)
        except ChildFailedError as exc:
            restarts = latest_attempt(Path(folder))
            attempt = Path(folder, ATTEMPT_DIR.format(attempt=restarts))
            error = _root_cause(exc, attempt, Path(folder, _AGENT_LOGS))
            raise _after_restarts(error, restarts, launch_config.max_restarts) from None
        finally:
            # The rendezvous numbered this job's attempts for its workers (stores.py); a later
            # run in this process, one without the agent above all, must not read them.
            os.environ.pop(ATTEMPT_ENV, None)
            os.environ.pop(LAUNCHER_PID_ENV, None)


def _after_restarts(error: ShardwiseError, restarts: int, limit: int) -> ShardwiseError:
    """The root cause, saying that restarting the workers did not cure it."""
    if restarts == 0:
        return error
    text = f"{error} (still failing after {restarts} restart(s), --max-restarts {limit})"
    if isinstance(error, WorkerFailedError):
        return WorkerFailedError(text, worker_traceback=error.worker_traceback)
    return ShardwiseError(text)


def _user_error(folder: Path) -> ShardwiseError:
    """The user error a worker reported in this attempt, as the one line it wrote."""
    attempt = folder / ATTEMPT_DIR.format(attempt=latest_attempt(folder))
    for path in sorted(attempt.glob(ERROR_FILE_GLOB)):
        report = json.loads(path.read_text(encoding="utf-8"))
        if not report["peer_lost"]:
            return ShardwiseError(report["message"])
    return ShardwiseError("a worker stopped on a user error it did not describe; see above")


def _root_cause(
    exc: ChildFailedError, error_dir: Path, agent_logs: Path | None = None
) -> ShardwiseError:
    """The error to raise for a failed run: the root cause, never a peer it took down.

    A user error wins (its one line, as the worker wrote it); then the worker the agent saw fail,
    by what `@record` wrote to its error file when it raised, else by its exit code; then any
    other worker that raised; a rank that only lost its peer is reported only when nothing else
    is known.
    """
    reports = {
        int(path.stem.removeprefix("error-rank")): json.loads(path.read_text(encoding="utf-8"))
        for path in error_dir.glob(ERROR_FILE_GLOB)
    }
    for report in reports.values():
        if not report["peer_lost"]:
            return ShardwiseError(report["message"])
    failures = sorted(exc.failures.items())
    for rank, failure in failures:
        # The agent stops the surviving workers with SIGTERM; those are not the cause.
        stopped = failure.exitcode in (-signal.SIGTERM, EXIT_STOPPED)
        hung = _hung_peer(rank, failure, failures, reports)
        if hung is not None:
            return hung
        if _recorded(failure) or (rank not in reports and not stopped):
            return _worker_failure(rank, failure)
    # The agent returns only the worker it saw fail first, which may be a rank that merely lost
    # its peer while the one that raised was still exiting: every worker's error file counts.
    raised = _recorded_elsewhere(failures, agent_logs or error_dir / _AGENT_LOGS)
    if raised:
        return _worker_failure(*raised[0])
    if reports:
        return ShardwiseError(next(iter(reports.values()))["message"])
    return _worker_failure(*exc.get_first_failure())


def _hung_peer(
    rank: int,
    failure: ProcessFailure,
    failures: list[tuple[int, ProcessFailure]],
    reports: dict[int, dict],
) -> ShardwiseError | None:
    """A worker killed only at teardown, after a peer timed out waiting for it: the hung one.

    A stopped (SIGSTOP) or hung worker cannot die by itself: its peers time out in their
    collective (--timeout-s) and report a lost peer, then the agent kills it. It is the root
    cause, and the peers' timeout is what happened to it, not "a signal".
    """
    if failure.exitcode != -signal.SIGKILL or _recorded(failure) or rank in reports:
        return None
    lost = [
        (other.timestamp, reports[other_rank]["message"])
        for other_rank, other in failures
        if reports.get(other_rank, {}).get("peer_lost") and other.timestamp <= failure.timestamp
    ]
    if not lost:
        return None  # it died first (the kernel's OOM killer, an operator): a signal it was
    return ShardwiseError(
        f"worker rank {rank} stopped answering and was killed when the group was stopped: "
        f"{min(lost)[1]}"
    )


def _recorded(failure: ProcessFailure) -> dict | None:
    """What `@record` wrote for a worker that raised, or None for one that died without raising.

    `@record` (on train/worker.py's `main`, and the agent's wrapper around a function) writes
    {"message": {"message": "Type: text", "extraInfo": {"py_callstack": traceback}}}; os._exit,
    a signal or a segfault leave no such record.
    """
    recorded = failure.error_file_data.get("message")
    return recorded if isinstance(recorded, dict) and recorded.get("message") else None


def _recorded_elsewhere(
    failures: list[tuple[int, ProcessFailure]], agent_logs: Path
) -> list[tuple[int, ProcessFailure]]:
    """The other local workers that raised, by global rank, from their error files."""
    if not failures:
        return []
    reported = {failure.error_file for _, failure in failures}
    rank, failure = failures[0]
    first_global = rank - failure.local_rank  # a node's workers hold consecutive global ranks
    found = []
    # DefaultLogsSpecs keeps each worker's error file at <run_id>/attempt_N/<local_rank>/; the
    # last attempt's are the ones that failed the run.
    paths = sorted(agent_logs.glob("*/attempt_*/*/error.json"))
    last = max((path.parent.parent.name for path in paths), key=_attempt_number, default="")
    for path in paths:
        if str(path) in reported or path.parent.parent.name != last:
            continue
        if not path.parent.name.isdigit():
            continue
        local_rank = int(path.parent.name)
        try:
            other = ProcessFailure(local_rank=local_rank, pid=0, exitcode=1, error_file=str(path))
        except (ValueError, KeyError, TypeError):  # cut short as its worker was stopped
            continue
        if _recorded(other):
            found.append((first_global + local_rank, other))
    return found


def _attempt_number(name: str) -> int:
    return int(name.removeprefix("attempt_")) if name.startswith("attempt_") else -1


def _worker_failure(rank: int, failure: ProcessFailure) -> ShardwiseError:
    """What one failed worker left behind, as one line (and its traceback when it raised)."""
    recorded = _recorded(failure)
    if recorded is not None:
        return WorkerFailedError(
            f"worker rank {rank} failed: {first_line(recorded['message'])}",
            worker_traceback=str(recorded.get("extraInfo", {}).get("py_callstack", "")),
        )
    killed = " (killed by a signal)" if failure.exitcode < 0 else ""
    return ShardwiseError(
        f"worker rank {rank} failed with exit code {failure.exitcode}{killed} and left no "
        "error record; look for a crash above (out of memory, a native library abort)"
    )


def _quiet_agent_logs() -> None:
    # The agent's INFO chatter drowns the progress bar, and when a worker fails the agent logs
    # the worker's traceback wrapped in its own stack trace of the process pool: we report the
    # failure ourselves, once, from the worker's error record (see _root_cause).
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    logging.getLogger("torch.distributed.launcher").setLevel(logging.WARNING)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    # "Received SIGTERM death signal, shutting down workers": we say what happened, in one line.
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.ERROR)
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
