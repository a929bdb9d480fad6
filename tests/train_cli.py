"""`shardwise train` as a user runs it: a separate process, on 2 CPU workers, tiny and seeded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers import final_weights

QUICK_FLAGS = [
    "--nproc",
    "2",
    "--device",
    "cpu",
    "--model",
    "gru",
    "--max-len",
    "64",
    "--batch-size",
    "4",
    "--warmup-steps",
    "1",
    "--log-every",
    "1",
    "--no-tensorboard",
    "--sample-bytes",
    "0",
    "--timeout-s",
    "30",
    "--clip-norm",
    "0",
    "--batching",
    "fixed",
    "--lr",  # the rate the comparisons' tolerances were set at (see helpers.quick_config)
    "3e-3",
]


def train_command(corpus: Path, run_dir: Path, *flags: str) -> list[str]:
    return [
        *(sys.executable, "-m", "shardwise", "train", "--data", str(corpus)),
        *QUICK_FLAGS,
        *("--run-dir", str(run_dir), *flags),
    ]


def run_train(corpus: Path, run_dir: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    """A whole run to its end (100 s at most)."""
    return subprocess.run(
        train_command(corpus, run_dir, *flags),
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        env=_environment(env),
    )


def start_train(corpus: Path, run_dir: Path, *flags: str, **env: str) -> subprocess.Popen:
    """A run in the background, in a session of its own (a terminal's Ctrl-C reaches its group)."""
    return subprocess.Popen(
        train_command(corpus, run_dir, *flags),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=_environment(env),
    )


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, limit_s: float = 60) -> None:
    """Until rank 0 logged `step` in metrics.jsonl (one row a step with --log-every 1)."""
    deadline = time.monotonic() + limit_s
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {limit_s}s")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_identical_weights(run_a: Path, run_b: Path) -> None:
    """Bit for bit: the same seed on CPU gives the same floats, or the runs differed."""
    a, b = final_weights(run_a), final_weights(run_b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _environment(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}
