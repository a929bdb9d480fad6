"""Another local user attacks a running job's store, as `nobody`: nothing it writes is believed.

The attacker (tests/store_attacker.py) speaks torch's store protocol with the system Python,
lists the job's keys and writes to them. Without the job's secret none of it may run code, kill
a process or mislead: the run ends on one line naming the store. Needs root (to become nobody).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardwise.signed_store import SECRET_ENV
from shardwise.stores import free_port
from train_cli import start_train

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]

SYSTEM_PYTHON = "/usr/bin/python3"
TAMPERED = "a process that does not know the job's secret wrote to it"


def _can_become_nobody() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run the attacker as the user nobody"
    if shutil.which("setpriv") is None or not Path(SYSTEM_PYTHON).exists():
        return f"needs setpriv and {SYSTEM_PYTHON} for the attacker"
    return None


_WHY_NOT = _can_become_nobody()
pytestmark.append(pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT)))


@pytest.fixture(autouse=True)
def keep_the_suites_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, os.environ.get(SECRET_ENV, ""))


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder nobody can read (the attacker's script) but not write (the payload's marker)."""
    folder = Path(tempfile.mkdtemp(prefix="shardwise-attack-"))
    folder.chmod(0o755)
    script = folder / "store_attacker.py"
    shutil.copy(Path(__file__).with_name("store_attacker.py"), script)
    script.chmod(0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _attack(corpus: Path, run_dir: Path, folder: Path, *attack: str) -> tuple[str, str, int]:
    """Start a run, attack its store as nobody; (the attacker's output, the run's, its status).

    The run makes its own secret, as a one-node run does (conftest gives the suite one).
    """
    os.environ.pop(SECRET_ENV, None)  # restored by the fixture below
    port = free_port()
    run = start_train(
        corpus,
        run_dir,
        *("--rdzv-endpoint", f"127.0.0.1:{port}", "--max-steps", "600"),
        *("--heartbeat-timeout-s", "4", "--checkpoint-every", "0"),
    )
    try:
        attacker = subprocess.run(
            [
                *("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"),
                *(SYSTEM_PYTHON, str(folder / "store_attacker.py"), str(port), *attack),
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        _, err = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    return attacker.stdout + attacker.stderr, err, run.returncode


def test_a_pickle_in_the_rendezvous_state_never_runs(corpus, tmp_path, open_dir):
    marker = open_dir / "payload-ran"
    attacker, err, status = _attack(corpus, tmp_path / "run", open_dir, "pickle", str(marker))
    assert "wrote pickle to torch.rendezvous." in attacker, attacker
    assert not marker.exists(), "the store's reader unpickled another user's payload"
    assert status != 0
    assert TAMPERED in err.strip().splitlines()[-1], err
    assert "Traceback" not in err, err


def test_a_forged_heartbeat_kills_no_bystander(corpus, tmp_path, open_dir):
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        host = socket.gethostname()
        attacker, err, status = _attack(
            corpus, tmp_path / "run", open_dir, "heartbeat", host, str(bystander.pid)
        )
        assert f"framed pid {bystander.pid}" in attacker, attacker
        assert bystander.poll() is None, "the job killed a process on the store's word"
        assert status != 0
        assert TAMPERED in err.strip().splitlines()[-1], err
        assert "stopped answering" not in err, err
    finally:
        bystander.kill()
        bystander.wait()


def test_a_garbage_write_is_named_not_blamed_on_a_timeout(corpus, tmp_path, open_dir):
    attacker, err, status = _attack(corpus, tmp_path / "run", open_dir, "garbage", "-")
    assert "wrote garbage to torch.rendezvous." in attacker, attacker
    assert status != 0
    last = err.strip().splitlines()[-1]
    assert TAMPERED in last and "127.0.0.1" in last, err
    assert "timeout" not in last.lower() and "Traceback" not in err, err
