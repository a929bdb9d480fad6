"""A dead or hung asynchronous worker leaves the run; the servers and the other workers finish."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import final_weights, write_corpus
from stopping_model import MODEL_SPEC, stopping_module
from train_cli import summary

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(200)]

STEPS = 30


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """Three workers and a server; worker 1 is killed after step 3, worker 2 hangs."""
    root = tmp_path_factory.mktemp("survival")
    (root / "usermod.py").write_text(stopping_module(rank=2))
    corpus = write_corpus(root / "corpus.txt")
    run_dir = root / "run"
    command = [sys.executable, "-m", "shardwise", "train", "--model", MODEL_SPEC]
    command += ["--data", str(corpus), "--run-dir", str(run_dir), "--device", "cpu"]
    command += ["--nproc", "3", "--sync", "async", "--ps", "1", "--max-steps", str(STEPS)]
    command += ["--max-len", "32", "--batching", "fixed", "--batch-size", "4", "--lr", "5e-3"]
    command += ["--no-tensorboard", "--sample-bytes", "0", "--heartbeat-timeout-s", "5"]
    # Rank 0 waits 8 s after its first step: rank 1 must reach its step 3 (and die there) before
    # the servers' 30 steps are spent, which rank 0 alone could do first while rank 1 is still
    # starting on a busy machine (then rank 1 was told to stop before step 3 and never died).
    env = {
        **_environment(),
        "SHARDWISE_TESTING_KILL": "1:3",
        "SHARDWISE_TESTING_PAUSE": "0:1:8",
    }
    done = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    return done, run_dir


def test_the_run_finishes_its_budget_without_the_lost_workers(run: tuple) -> None:
    done, run_dir = run
    assert done.returncode == 0, done.stderr[-4000:]
    finished = summary(run_dir)
    assert finished["steps"] == STEPS
    assert finished["sync_workers_lost"] == {"1": "died of SIGKILL", "2": "died of SIGKILL"}
    # It learned: a uniform guess's loss is log(vocabulary); the servers' updates kept coming.
    assert finished["eval_loss"] < math.log(finished["vocab_size"]) - 0.5
    assert all(bool(tensor.isfinite().all()) for tensor in final_weights(run_dir).values())


def test_each_lost_worker_is_one_line_and_nothing_is_left_behind(run: tuple) -> None:
    done, _ = run
    said = [line for line in done.stderr.splitlines() if "goes on without it" in line]
    assert sorted(line.split(" died")[0] for line in said) == [
        "shardwise: worker rank 1",
        "shardwise: worker rank 2",
    ], done.stderr[-4000:]
    assert "Traceback" not in done.stderr and "shardwise: error" not in done.stderr
    leftovers = subprocess.run(
        ["pgrep", "-f", MODEL_SPEC], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""  # the hung worker was killed, not left stopped


def _environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("SHARDWISE_")}
