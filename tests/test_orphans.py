"""Workers never outlive their launcher, and never write a checkpoint without the run's lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from processes import alive, descendants
from shardwise.config import TrainConfig
from shardwise.run_dir import hold_run_dir, holds_lease
from shardwise.signed_store import SECRET_ENV
from train_cli import start_train, wait_for_step

pytestmark = pytest.mark.timeout(120)


@pytest.mark.distributed
def test_workers_die_with_a_launcher_killed_by_sigkill(corpus, tmp_path):
    run_dir = tmp_path / "run"
    run = start_train(corpus, run_dir, "--max-steps", "2000", "--checkpoint-every", "0")
    try:
        wait_for_step(run_dir, 2, run)
        workers = descendants(run.pid)
        assert len(workers) >= 2, workers
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive(workers) == [], "workers trained on without their launcher"
    finally:
        for pid in alive(workers if "workers" in locals() else []):
            os.kill(pid, signal.SIGKILL)


def test_the_lease_is_held_only_while_the_lock_is_ours(tmp_path):
    run_dir = tmp_path / "run"
    config = TrainConfig(run_dir=str(run_dir))
    assert not holds_lease(run_dir)  # nobody locked it
    with hold_run_dir(config, run_dir):
        assert holds_lease(run_dir)
    assert not holds_lease(run_dir)  # the launcher is gone: its lock with it
    # Another run took the freed lock: a worker of the old one must not write.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from shardwise.config import TrainConfig; from shardwise.run_dir import hold_run_dir; "
            "d = Path(sys.argv[1]); "
            "ctx = hold_run_dir(TrainConfig(run_dir=str(d), resume=str(d)), d); ctx.__enter__(); "
            "print('held', flush=True); time.sleep(60)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, SECRET_ENV: "another job's secret"},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not holds_lease(run_dir)
    finally:
        holder.kill()
        holder.wait()
