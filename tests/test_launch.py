"""The launcher names the root cause of a failed run from the workers' error records, and
`shardwise.launch` runs a user's own function on local workers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from shardwise.agent import _AGENT_LOGS, _root_cause, _start_method
from shardwise.errors import ShardwiseError, WorkerFailedError


def agent_error_file(error_dir: Path, local_rank: int, message: str | None) -> str:
    """Where the agent's `@record` writes a worker's error, with what it writes when it raised."""
    path = error_dir / _AGENT_LOGS / "run_x" / "attempt_0" / str(local_rank) / "error.json"
    path.parent.mkdir(parents=True)
    if message is not None:
        record = {
            "message": message,
            "extraInfo": {"py_callstack": f"Traceback\n{message}\n", "timestamp": "0"},
        }
        path.write_text(json.dumps({"message": record}))
    return str(path)


def peer_lost_report(error_dir: Path, rank: int) -> None:
    report = {"message": f"rank {rank} lost contact with its peers", "peer_lost": True}
    (error_dir / f"error-rank{rank}.txt").write_text(json.dumps(report))


def test_a_worker_that_raised_is_the_cause_even_when_its_peer_was_seen_first(
    tmp_path: Path,
) -> None:
    # The agent saw rank 0 (which only lost its peer) exit first; rank 1 raised the real error.
    peer_lost_report(tmp_path, 0)
    first_seen = agent_error_file(tmp_path, 0, None)
    agent_error_file(tmp_path, 1, "IndexError: index 300 is out of bounds")
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=first_seen)
    error = _root_cause(ChildFailedError("run_worker", {0: failure}), tmp_path)
    assert isinstance(error, WorkerFailedError)
    assert str(error) == "worker rank 1 failed: IndexError: index 300 is out of bounds"
    assert "IndexError" in error.worker_traceback


def test_a_user_error_comes_before_a_recorded_one(tmp_path: Path) -> None:
    report = {"message": "--data x: not found", "peer_lost": False}
    (tmp_path / "error-rank1.txt").write_text(json.dumps(report))
    recorded = agent_error_file(tmp_path, 0, "RuntimeError: follow-on failure")
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=recorded)
    error = _root_cause(ChildFailedError("run_worker", {0: failure}), tmp_path)
    assert str(error) == "--data x: not found"
    assert not isinstance(error, WorkerFailedError)


def test_only_a_lost_peer_is_reported_as_such(tmp_path: Path) -> None:
    peer_lost_report(tmp_path, 1)
    failure = ProcessFailure(
        local_rank=1, pid=1, exitcode=2, error_file=agent_error_file(tmp_path, 1, None)
    )
    error = _root_cause(ChildFailedError("run_worker", {1: failure}), tmp_path)
    assert str(error) == "rank 1 lost contact with its peers"


def test_a_worker_killed_at_teardown_after_its_peer_timed_out_is_the_hung_one(
    tmp_path: Path,
) -> None:
    # Rank 1 was stopped (SIGSTOP, heartbeat off): rank 0 timed out waiting for it and reported
    # a lost peer; the agent then killed rank 1 (SIGKILL: a stopped process ignores SIGTERM).
    peer_lost_report(tmp_path, 0)
    timed_out = ProcessFailure(0, pid=1, exitcode=2, error_file=agent_error_file(tmp_path, 0, None))
    killed = ProcessFailure(1, pid=2, exitcode=-9, error_file=agent_error_file(tmp_path, 1, None))
    killed.timestamp = timed_out.timestamp + 30
    error = _root_cause(ChildFailedError("run_worker", {0: timed_out, 1: killed}), tmp_path)
    assert str(error) == (
        "worker rank 1 stopped answering and was killed when the group was stopped: "
        "rank 0 lost contact with its peers"
    )
    # Killed before its peer noticed anything (the OOM killer): a signal, as it was.
    killed.timestamp = timed_out.timestamp - 5
    error = _root_cause(ChildFailedError("run_worker", {0: timed_out, 1: killed}), tmp_path)
    assert "exit code -9 (killed by a signal)" in str(error)


# shardwise.launch from a script (workers spawned: the script needs its main guard) and from a
# notebook or REPL, here `python -c` (no __main__.__file__: workers forked, `fn` defined inline).
YOUR_OWN_LOOP = """
    import os

    import torch

    import shardwise
    from shardwise.errors import WorkerFailedError


    def count_ranks(tag):
        session = shardwise.setup(device="cpu")
        total = session.mean(torch.tensor(1.0)) * session.world_size
        session.close()
        return [tag, os.environ["RANK"], os.environ["MASTER_ADDR"], total]


    def fail_on_rank_one():
        if os.environ["RANK"] == "1":
            raise ValueError("rank one cannot go on")


    if __name__ == "__main__":
        print("returned:", shardwise.launch(count_ranks, 2, "mine"), flush=True)
        try:
            shardwise.launch(fail_on_rank_one, 2)
        except WorkerFailedError as exc:
            print("failed:", exc, "|", "ValueError" in exc.worker_traceback, flush=True)
"""


def launched(tmp_path: Path, how: str) -> list[str]:
    """Run YOUR_OWN_LOOP as a script file or as `python -c`; its output lines."""
    source = textwrap.dedent(YOUR_OWN_LOOP)
    (tmp_path / "own_loop.py").write_text(source)
    command = ["own_loop.py"] if how == "script" else ["-c", source]
    result = subprocess.run(
        [sys.executable, *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line.startswith(("returned", "failed"))]


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["script", "notebook"])
def test_launch_runs_your_function_on_each_worker_and_returns_rank_zeros(
    tmp_path: Path, how: str
) -> None:
    assert launched(tmp_path, how) == [
        "returned: ['mine', '0', '127.0.0.1', 2.0]",
        "failed: worker rank 1 failed: ValueError: rank one cannot go on | True",
    ]


def test_launch_from_a_notebook_refuses_once_cuda_is_initialised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A notebook's __main__ has no file: its workers would be forked, which CUDA does not survive.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ShardwiseError, match="CUDA is already initialised") as refused:
        _start_method()
    assert "\n" not in str(refused.value)
