"""The launcher names the root cause of a failed run from the workers' error records."""

from __future__ import annotations

import json
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from shardwise.errors import WorkerFailedError
from shardwise.launch import _AGENT_LOGS, _root_cause


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
