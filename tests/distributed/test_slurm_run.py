"""Two `shardwise train` processes with srun's environment for a 2-node job train as one.

No flags name the nodes, the rank or the rendezvous: each process takes them from SLURM_*
variables set as `srun --nodes=2 --ntasks-per-node=1` sets them, with the node list
`127.0.0.[1-2]` (both loopback addresses, so the first node's resolves on this machine).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shardwise.slurm import RDZV_PORT_BASE, RDZV_PORT_SPAN, rendezvous_port
from slurm_env import srun_env


def job_id_with_free_port() -> int:
    """A job id whose derived rendezvous port is free here now."""
    for job_id in range(os.getpid() % RDZV_PORT_SPAN, 2 * RDZV_PORT_SPAN, 97):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", rendezvous_port(job_id)))
            except OSError:
                continue
        return job_id + RDZV_PORT_SPAN  # a realistic 5-digit id with the same port
    pytest.fail(f"no free port between {RDZV_PORT_BASE} and {RDZV_PORT_BASE + RDZV_PORT_SPAN}")


def srun_node_env(job_id: int, node_id: int) -> dict[str, str]:
    """This environment without any SLURM or torchrun variables, plus srun's for `node_id`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return {**env, **srun_env(2, node_id, nodelist="127.0.0.[1-2]", job_id=job_id)}


@pytest.mark.timeout(240)
def test_two_nodes_from_srun_environment(corpus: Path, tmp_path: Path) -> None:
    job_id = job_id_with_free_port()
    nodes = []
    for node_id in (0, 1):
        run_dir = tmp_path / f"node{node_id}"
        command = [
            sys.executable,
            "-m",
            "shardwise",
            "train",
            *("--data", str(corpus), "--model", "gru", "--max-len", "64"),
            *("--max-steps", "2", "--sample-bytes", "0"),
            *("--nproc", "1", "--timeout-s", "60", "--run-dir", str(run_dir)),
        ]
        nodes.append(
            subprocess.Popen(
                command,
                cwd=tmp_path,
                env=srun_node_env(job_id, node_id),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=200))
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    port = rendezvous_port(job_id)
    assert f"SLURM: 2 nodes, this is node 0, rendezvous at 127.0.0.1:{port}" in outputs[0][1]
    assert f"SLURM: 2 nodes, this is node 1, rendezvous at 127.0.0.1:{port}" in outputs[1][1]
    summary = json.loads((tmp_path / "node0" / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (2, 2)
