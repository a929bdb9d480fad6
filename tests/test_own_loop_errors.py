"""A script's own loop: a mistake shardwise names is one line, any other error its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(90)


def run_script(body: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import shardwise\n" + body],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_a_layout_the_job_cannot_fill_is_one_line_naming_torchrun() -> None:
    done = run_script("shardwise.setup(pp=2, device='cpu')")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith("shardwise: error: --dp 1 x --pp 2") and "torchrun" in done.stderr


def test_an_error_of_the_script_s_own_keeps_its_traceback() -> None:
    done = run_script("shardwise.setup(device='cpu')\nraise ValueError('mine')")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ValueError: mine" in done.stderr
