"""A stopped rank (SIGSTOP) is found by its heartbeat in seconds, not at the collective timeout."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import write_corpus
from stopping_model import MODEL_SPEC, stopping_module

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


def test_a_stopped_rank_ends_the_run_in_one_line_well_before_the_timeout(tmp_path: Path) -> None:
    (tmp_path / "usermod.py").write_text(stopping_module(rank=1))
    corpus = write_corpus(tmp_path / "corpus.txt")
    command = [sys.executable, "-m", "shardwise", "train", "--model", MODEL_SPEC]
    command += ["--data", str(corpus), "--run-dir", str(tmp_path / "run"), "--nproc", "2"]
    command += ["--max-len", "32", "--batching", "fixed", "--batch-size", "4", "--max-steps"]
    command += ["50", "--no-tensorboard", "--max-restarts", "0", "--timeout-s", "600"]
    command += ["--heartbeat-timeout-s", "5"]
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=110, check=False
    )
    took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("shardwise: error")]
    assert len(errors) == 1, done.stderr
    assert "rank 1 on " in errors[0] and "stopped answering: no heartbeat for" in errors[0]
    assert "Traceback" not in done.stderr
    # Collectives would wait out --timeout-s 600; the heartbeat speaks after 5 s of silence.
    assert took < 60, took
    leftovers = subprocess.run(
        ["pgrep", "-f", MODEL_SPEC], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""  # the stopped rank was killed, not left behind
