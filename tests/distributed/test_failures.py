"""A dead, hung or missing peer becomes a clear error in bounded time, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import quick_config, train
from shardwise.errors import ShardwiseError
from shardwise.stores import free_port

FAULTY_MODEL = """
import os
import time
from shardwise.models import RecurrentLM

class FaultOnRankOne(RecurrentLM):
    calls = 0

    def forward(self, tokens, lengths=None):
        FaultOnRankOne.calls += 1
        if os.environ.get("RANK") == "1" and FaultOnRankOne.calls == 2:
            {fault}
        return super().forward(tokens, lengths)

def make(vocab_size):
    return FaultOnRankOne(vocab_size, embed_dim=16, hidden_dim=16, num_layers=1, cell="gru")
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("os._exit(7)", "worker rank 1 failed with exit code 7"),
        ("time.sleep(120)", "rank 0 lost contact with its peers .*Timed out"),
    ],
    ids=["dies", "hangs"],
)
def test_a_worker_that_dies_or_hangs_fails_the_run_in_bounded_time(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, message: str
) -> None:
    (tmp_path / "faulty_model.py").write_text(FAULTY_MODEL.replace("{fault}", fault))
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    # No restarts: the failure itself must be quick (tests/distributed/test_recovery.py
    # covers a failure that outlasts --max-restarts).
    config = quick_config(
        corpus,
        tmp_path / "run",
        model="faulty_model:make",
        max_steps=50,
        timeout_s=4,
        max_restarts=0,
    )
    started = time.monotonic()
    with pytest.raises(ShardwiseError, match=message):
        train(config, nproc=2)
    assert time.monotonic() - started < 45


@pytest.mark.timeout(60)
def test_a_peer_that_never_joins_is_an_error_after_the_timeout() -> None:
    script = textwrap.dedent("""
        from shardwise.distributed import init_distributed
        from shardwise.errors import ShardwiseError
        try:
            init_distributed("cpu", timeout_s=3)
        except ShardwiseError as exc:
            print("ERROR:", exc)
    """)
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert "ERROR: rank 0: could not join the 2-process group within 3s" in result.stdout
    assert time.monotonic() - started < 40


@pytest.mark.timeout(60)
def test_a_missing_node_is_a_clear_rendezvous_error(corpus: Path, tmp_path: Path) -> None:
    config = quick_config(
        corpus,
        tmp_path / "run",
        nnodes=2,
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        timeout_s=5,
    )
    with pytest.raises(ShardwiseError, match="2 nodes did not all join within 5s"):
        train(config, nproc=1)
    assert not (tmp_path / "run").exists()
