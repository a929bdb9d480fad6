"""SIGTERM at any moment of start-up: a line saying so, a documented status, and no orphan."""

from __future__ import annotations

import signal
import time

import pytest

from processes import alive, descendants
from train_cli import start_train

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

# From the first import to the first steps (about 8 s here): the checks, the lock, the agent,
# the workers' start and their process group.
OFFSETS_S = (0.3, 1.0, 2.0, 3.5, 5.0, 7.0, 9.0)
# 143: stopped before a checkpoint (128 + SIGTERM); 75: stopped after a step, with one.
DOCUMENTED = {128 + signal.SIGTERM, 75}


@pytest.mark.parametrize("offset_s", OFFSETS_S)
def test_sigterm_during_start_up_is_said_and_leaves_no_orphan(corpus, tmp_path, offset_s):
    run = start_train(corpus, tmp_path / "run", "--max-steps", "300", "--checkpoint-every", "0")
    seen: set[int] = set()
    deadline = time.monotonic() + offset_s
    while time.monotonic() < deadline:  # every process it starts, as they come
        seen.update(descendants(run.pid))
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    try:
        out, err = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
    if "shardwise: run dir" not in out:
        # Still importing Python and torch: the kernel's default ending (a shell shows 143),
        # before shardwise could say a word or start anything.
        assert run.returncode == -signal.SIGTERM and not seen, (seen, err[-2000:])
    else:
        assert run.returncode in DOCUMENTED, (run.returncode, err[-2000:])
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert last.startswith("shardwise:") and "SIGTERM" in last, err[-2000:]
    limit = time.monotonic() + 10
    while alive(sorted(seen)) and time.monotonic() < limit:
        time.sleep(0.1)
    assert alive(sorted(seen)) == [], "processes outlived the stopped launcher"
