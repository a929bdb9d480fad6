"""The supervising parent of an asynchronous worker passes its statuses and signals on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

# A launcher stand-in (the agent's process) notes the give-up signal; its child supervises a
# worker that sends that signal to its parent, as worker.py's user-error report does, and
# exits with the user-error status.
WORKER = "import os, signal; os.kill(os.getppid(), signal.SIGUSR1); raise SystemExit(2)"
SUPERVISOR = textwrap.dedent(f"""
    import sys
    from shardwise.train.supervisor import supervise

    sys.exit(supervise([sys.executable, "-c", {WORKER!r}]))
""")
LAUNCHER = textwrap.dedent(f"""
    import signal, subprocess, sys
    from pathlib import Path
    from shardwise.train.preemption import GIVE_UP_SIGNAL

    signal.signal(GIVE_UP_SIGNAL, lambda *_: Path(sys.argv[1]).write_text("given up"))
    sys.exit(subprocess.run([sys.executable, "-c", {SUPERVISOR!r}]).returncode)
""")


def test_a_workers_user_error_reaches_the_launcher_and_its_status_is_kept(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "gave-up"
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(marker)], capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 2, done.stderr
    assert marker.read_text() == "given up"
