"""Start the workers of a run through torch.distributed.run's elastic agent.

    summary = launch_workers(config, nproc=2)   # rank 0's summary once every worker is done

The agent does what `torchrun` does (c10d rendezvous, worker monitoring, teardown of the rest
when one dies); we call it programmatically so `shardwise train` needs no wrapper script. A
worker that fails on a user mistake leaves its one-line message in a file for the launcher to
print; any other failure keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from shardwise.config import TrainConfig, parse_endpoint
from shardwise.distributed import init_distributed, shutdown_distributed
from shardwise.errors import ShardwiseError
from shardwise.train.run import train

_ERROR_FILE = "error-rank{rank}.txt"


def launch_workers(config: TrainConfig, nproc: int) -> dict:
    """Run `nproc` workers on this node (of `config.nnodes`) and return rank 0's summary."""
    endpoint = config.rdzv_endpoint or f"localhost:{free_port()}"
    if config.nnodes == 1 and config.rdzv_endpoint:
        check_port_free(endpoint)
    static = config.node_rank is not None
    rdzv_configs: dict[str, object] = {"join_timeout": int(config.timeout_s)}
    if static:
        rdzv_configs["rank"] = config.node_rank
    launch_config = LaunchConfig(
        min_nodes=config.nnodes,
        max_nodes=config.nnodes,
        nproc_per_node=nproc,
        run_id="shardwise" if config.nnodes > 1 else uuid.uuid4().hex[:8],
        rdzv_backend="static" if static else "c10d",
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs,
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    _quiet_agent_logs()
    with tempfile.TemporaryDirectory(prefix="shardwise-") as error_dir:
        try:
            results = elastic_launch(launch_config, run_worker)(config.model_dump_json(), error_dir)
        except ChildFailedError as exc:
            raise ShardwiseError(_failure_message(exc, Path(error_dir))) from None
    return results.get(0) or next(iter(results.values()), {})


def run_worker(config_json: str, error_dir: str | None = None) -> dict:
    """A worker process's entry point: join the group, train, leave the group."""
    config = TrainConfig.model_validate_json(config_json)
    try:
        env = init_distributed(config.device, config.timeout_s)
        try:
            return train(config, env)
        finally:
            shutdown_distributed()
    except ShardwiseError as exc:
        if error_dir is None:
            raise
        rank = os.environ.get("RANK", "0")
        Path(error_dir, _ERROR_FILE.format(rank=rank)).write_text(str(exc), encoding="utf-8")
        sys.exit(2)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def check_port_free(endpoint: str) -> None:
    """Fail clearly, before any worker starts, if this machine's rendezvous port is taken."""
    host, port = parse_endpoint(endpoint)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            raise ShardwiseError(
                f"--rdzv-endpoint {endpoint}: port {port} is already in use; pick another port "
                "or leave --rdzv-endpoint out to use a free one"
            ) from None


def _failure_message(exc: ChildFailedError, error_dir: Path) -> str:
    messages = sorted(error_dir.glob("error-rank*.txt"))
    if messages:
        return messages[0].read_text(encoding="utf-8")
    rank, failure = exc.get_first_failure()
    return (
        f"worker rank {rank} failed with exit code {failure.exitcode}"
        f"{' (killed by a signal)' if failure.exitcode < 0 else ''}; see its output above"
    )


def _quiet_agent_logs() -> None:
    # The agent's INFO chatter drowns the progress bar; its warnings and errors still show.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    logging.getLogger("torch.distributed.launcher").setLevel(logging.WARNING)
