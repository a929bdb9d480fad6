"""Start the workers of a run through torch.distributed.run's elastic agent.

    summary = launch_workers(config, nproc=2)   # rank 0's summary once every worker is done

The agent does what `torchrun` does (c10d rendezvous, worker monitoring, teardown of the rest
when one dies); we call it programmatically so `shardwise train` needs no wrapper script. A
worker that fails on a user mistake leaves its one-line message in a file for the launcher to
print. Any other exception is written to the worker's error file by the agent's own `@record`
wrapper (TORCHELASTIC_ERROR_FILE); the launcher raises it as a `WorkerFailedError` carrying the
worker's type, message and traceback, so the root cause reaches the user exactly once.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous import RendezvousError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from shardwise.config import TrainConfig, parse_endpoint
from shardwise.errors import ShardwiseError, WorkerFailedError, first_line
from shardwise.stores import LOOPBACK, bind_configs, loopback_comms, port_in_use, rendezvous_backend
from shardwise.train.worker import ERROR_FILE_GLOB, run_worker

T = TypeVar("T")
_AGENT_LOGS = "agent"


def launch_workers(config: TrainConfig, nproc: int) -> dict:
    """Run `nproc` workers on this node (of `config.nnodes`) and return rank 0's summary.

    The job's store listens on loopback for one node, else on the endpoint's address only
    (see shardwise.stores).
    """
    endpoint = config.rdzv_endpoint or f"localhost:{free_port()}"
    if config.nnodes == 1 and config.rdzv_endpoint:
        check_port_free(endpoint)
    static = config.node_rank is not None
    rdzv_configs: dict[str, object] = {
        "join_timeout": int(config.timeout_s),
        **bind_configs(endpoint, config.nnodes),
    }
    if static:
        rdzv_configs["rank"] = config.node_rank
    launch_config = LaunchConfig(
        min_nodes=config.nnodes,
        max_nodes=config.nnodes,
        nproc_per_node=nproc,
        run_id="shardwise" if config.nnodes > 1 else uuid.uuid4().hex[:8],
        rdzv_backend=rendezvous_backend(static),
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs,
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    _quiet_agent_logs()
    with (
        loopback_comms(config.nnodes),
        tempfile.TemporaryDirectory(prefix="shardwise-") as error_dir,
    ):
        # The agent's per-worker error files (what `@record` writes) go into the same temporary
        # folder, so they are removed with it rather than left in /tmp/torchelastic_* per run.
        launch_config.logs_specs = DefaultLogsSpecs(log_dir=str(Path(error_dir, _AGENT_LOGS)))
        try:
            results = elastic_launch(launch_config, run_worker)(config.model_dump_json(), error_dir)
        except ChildFailedError as exc:
            raise _root_cause(exc, Path(error_dir)) from None
        except RendezvousError as exc:
            raise ShardwiseError(
                f"rendezvous at {endpoint}: the {config.nnodes} nodes did not all join within "
                f"{config.timeout_s:g}s ({type(exc).__name__}); start `shardwise train` on every "
                "node with the same --nnodes and --rdzv-endpoint"
            ) from None
    return results.get(0) or next(iter(results.values()), {})


def run_local(entrypoint: Callable[..., T], nproc: int, *args: object) -> dict[int, T]:
    """Run `entrypoint(*args)` on `nproc` local gloo/NCCL workers; their returns by rank.

        results = run_local(measure, 2, "lstm")   # {0: ..., 1: ...}

    For benchmarks and tools that need a plain local job through the same elastic agent; its
    store listens on loopback only.
    """
    endpoint = f"localhost:{free_port()}"
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend=rendezvous_backend(static=False),
        rdzv_endpoint=endpoint,
        rdzv_configs=bind_configs(endpoint, nnodes=1),
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    _quiet_agent_logs()
    with loopback_comms(nnodes=1):
        return elastic_launch(launch_config, entrypoint)(*args)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def check_port_free(endpoint: str) -> None:
    """Fail clearly, before any worker starts, if a one-node run's rendezvous port is taken.

    Probes loopback, where a one-node run's store listens whatever host the endpoint names.
    """
    _, port = parse_endpoint(endpoint)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            raise port_in_use(endpoint, port) from None


def _root_cause(exc: ChildFailedError, error_dir: Path) -> ShardwiseError:
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
        if _recorded(failure) or (rank not in reports and failure.exitcode != -signal.SIGTERM):
            return _worker_failure(rank, failure)
    # The agent returns only the worker it saw fail first, which may be a rank that merely lost
    # its peer while the one that raised was still exiting: every worker's error file counts.
    raised = _recorded_elsewhere(failures, error_dir / _AGENT_LOGS)
    if raised:
        return _worker_failure(*raised[0])
    if reports:
        return ShardwiseError(next(iter(reports.values()))["message"])
    return _worker_failure(*exc.get_first_failure())


def _recorded(failure: ProcessFailure) -> dict | None:
    """What `@record` wrote for a worker that raised, or None for one that died without raising.

    `@record` (the agent's wrapper around every function entrypoint) writes
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
    # DefaultLogsSpecs keeps each worker's error file at <run_id>/attempt_N/<local_rank>/.
    for path in sorted(agent_logs.glob("*/attempt_*/*/error.json")):
        if str(path) in reported or not path.parent.name.isdigit():
            continue
        local_rank = int(path.parent.name)
        try:
            other = ProcessFailure(local_rank=local_rank, pid=0, exitcode=1, error_file=str(path))
        except (ValueError, KeyError, TypeError):  # cut short as its worker was stopped
            continue
        if _recorded(other):
            found.append((first_global + local_rank, other))
    return found


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
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
