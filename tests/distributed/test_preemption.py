"""SIGTERM or Ctrl-C: every rank stops after the same step with a checkpoint; --resume is exact."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_cli import assert_identical_weights, run_train, start_train, summary, wait_for_step

FLAGS = ("--max-steps", "40")
PREEMPTED = re.compile(
    r"shardwise: preempted at step (\d+) \((SIGTERM|SIGINT)\); checkpoint saved to (\S+); "
    r"continue with --resume (\S+)"
)
# Each step's gradient exchange costs 0.3 s more (train/faults.py's slow link): steps slow enough
# for a second Ctrl-C to land while the first one's step and checkpoint are still under way.
SLOW_STEPS = {"SHARDWISE_TESTING_COLLECTIVE_DELAY_S": "0.3"}


def stop(process: subprocess.Popen, *signals: signal.Signals) -> tuple[int, str]:
    """Send `signals` to the launcher's process group, as a terminal's Ctrl-C does."""
    for sent in signals:
        os.killpg(process.pid, sent)
        time.sleep(0.1)
    _, stderr = process.communicate(timeout=90)
    return process.returncode, stderr


def last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


@pytest.mark.timeout(300)
def test_sigterm_saves_a_checkpoint_and_resume_ends_bit_identical(
    corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "preempted"
    process = start_train(corpus, run_dir, *FLAGS)
    wait_for_step(run_dir, 2, process)
    status, stderr = stop(process, signal.SIGTERM)
    match = PREEMPTED.fullmatch(last_line(stderr))
    assert status == 75, stderr
    assert match is not None, stderr
    step, checkpoint = int(match[1]), Path(match[3])
    assert match[2] == "SIGTERM" and Path(match[4]) == run_dir
    assert 2 <= step < 40
    assert checkpoint == run_dir / "checkpoints" / f"step_{step:08d}"
    assert (checkpoint / "manifest.json").is_file()  # sealed: complete

    resumed = run_train(corpus, run_dir, *FLAGS, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert summary(run_dir)["steps"] == 40
    assert summary(run_dir)["restarts"] == []  # a preemption is no failure
    whole = run_train(corpus, tmp_path / "whole", *FLAGS)
    assert whole.returncode == 0, whole.stderr
    assert_identical_weights(run_dir, tmp_path / "whole")


@pytest.mark.timeout(200)
def test_ctrl_c_saves_a_checkpoint_and_a_second_one_aborts_at_once(
    corpus: Path, tmp_path: Path
) -> None:
    once = start_train(corpus, tmp_path / "once", *FLAGS)
    wait_for_step(tmp_path / "once", 1, once)
    status, stderr = stop(once, signal.SIGINT)
    match = PREEMPTED.fullmatch(last_line(stderr))
    assert status == 75, stderr
    assert match is not None and match[2] == "SIGINT", stderr
    assert Path(match[3]).is_dir()

    twice = start_train(corpus, tmp_path / "twice", *FLAGS, **SLOW_STEPS)
    wait_for_step(tmp_path / "twice", 1, twice)
    started = time.monotonic()
    status, stderr = stop(twice, signal.SIGINT, signal.SIGINT)
    assert (status, last_line(stderr)) == (130, "shardwise: interrupted")
    assert time.monotonic() - started < 10  # not the 30 s grace period


@pytest.mark.timeout(200)
def test_sigterm_with_data_loading_workers_still_saves_a_checkpoint(
    corpus: Path, tmp_path: Path
) -> None:
    # The agent signals each worker's whole process group: its DataLoader workers too.
    run_dir = tmp_path / "loaders"
    process = start_train(corpus, run_dir, *FLAGS, "--num-workers", "2")
    wait_for_step(run_dir, 2, process)
    status, stderr = stop(process, signal.SIGTERM)
    match = PREEMPTED.fullmatch(last_line(stderr))
    assert status == 75 and match is not None, stderr
    assert (Path(match[3]) / "manifest.json").is_file()


@pytest.mark.timeout(300)
def test_a_preempted_run_resumes_with_the_printed_command_alone(
    corpus: Path, tmp_path: Path
) -> None:
    # Settings far from the defaults: a resume that fell back to any of them would not match.
    own = ("--model", "gru", "--lr", "1e-3", "--batching", "tokens", "--tokens-per-batch", "1024")
    own += ("--max-steps", "30", "--warmup-steps", "3")
    quiet = ("--log-every", "1", "--no-tensorboard", "--sample-bytes", "0")
    launch = [sys.executable, "-m", "shardwise", "train", "--data", str(corpus), *own, *quiet]
    run_dir = tmp_path / "a"
    process = subprocess.Popen(
        [*launch, "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_step(run_dir, 2, process)
    status, stderr = stop(process, signal.SIGTERM)
    match = PREEMPTED.fullmatch(last_line(stderr))
    assert status == 75 and match is not None, stderr
    printed = ["--resume", match[4]]  # what the line tells the user to run, and nothing else
    resumed = subprocess.run(
        [sys.executable, "-m", "shardwise", "train", *printed],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(run_dir)["steps"] == 30 and summary(run_dir)["model"] == "gru"
    whole = tmp_path / "whole"
    done = subprocess.run(
        [*launch, "--run-dir", str(whole)],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_identical_weights(run_dir, whole)
