"""The launcher says in one line what it starts, before the seconds of checks that follow."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def test_the_first_line_names_the_run_dir_workers_and_device(tmp_path) -> None:
    # A missing --data fails in the checks, after the line: the line comes first.
    run = subprocess.run(
        [
            *(sys.executable, "-m", "shardwise", "train", "--data", str(tmp_path / "none.txt")),
            *("--run-dir", str(tmp_path / "run"), "--nproc", "2", "--device", "cpu"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = run.stdout.strip().splitlines()
    assert lines[0] == (
        f"shardwise: run dir {tmp_path / 'run'}: 2 worker(s) on cpu; checking the model and data"
    ), run.stdout
    errors = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(errors) == 1 and "file not found" in errors[0]
