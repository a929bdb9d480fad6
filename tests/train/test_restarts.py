"""The pure parts of recovery and preemption: who ended an attempt, lost rows, exit statuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardwise.config import TrainConfig
from shardwise.errors import ShardwiseError
from shardwise.run_dir import hold_run_dir
from shardwise.train.preemption import EXIT_PREEMPTED, Preempted
from shardwise.train.restarts import drop_metrics_after, failure_cause


@pytest.mark.parametrize(
    ("notes", "cause"),
    [
        # The rank that left no note died; its peers only lost it or were stopped.
        ({0: {"error": {"message": "rank 0 lost contact", "peer_lost": True}}}, 1),
        ({0: {"stopped": {}}, 2: {"stopped": {}}}, 1),
        # An exception beats a silent rank; a user error beats both.
        ({1: {"stopped": {}}, 0: {"raised": {"message": "TypeError: no"}}}, 0),
        (
            {
                0: {"raised": {"message": "E: x"}},
                2: {"error": {"message": "--data", "peer_lost": 0}},
            },
            2,
        ),
    ],
)
def test_the_cause_of_a_failed_attempt(notes: dict, cause: int) -> None:
    rank, reason = failure_cause(notes, world_size=3 if 2 in notes else 2)
    assert rank == cause
    assert reason


def test_a_lost_peer_is_the_cause_only_when_nothing_else_is_known() -> None:
    notes = {0: {"stopped": {}}, 1: {"error": {"message": "rank 1 lost contact", "peer_lost": 1}}}
    assert failure_cause(notes, world_size=2) == (1, "rank 1 lost contact")
    assert failure_cause({1: {"raised": {"message": "KeyError: 3"}}}, 1) == (
        1,
        "worker rank 1 failed: KeyError: 3",
    )


def test_metrics_rows_of_lost_steps_are_dropped(tmp_path: Path) -> None:
    rows = [{"step": step, "loss": 1.0} for step in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    drop_metrics_after(tmp_path, 3)
    kept = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert kept == [1, 2, 3]
    drop_metrics_after(tmp_path / "nowhere", 3)  # no metrics yet: nothing to do


def test_exit_statuses_and_lines_of_a_stopped_run(tmp_path: Path) -> None:
    saved = Preempted(37, tmp_path / "run" / "checkpoints" / "step_00000037", "SIGTERM")
    assert saved.exit_status == EXIT_PREEMPTED == 75
    assert str(saved).endswith(f"step_00000037; continue with --resume {tmp_path / 'run'}")
    unsaved = Preempted(None, None, "SIGINT")
    assert unsaved.exit_status == 130
    assert str(unsaved) == "stopped by SIGINT before a checkpoint was saved"
    earlier = Preempted(None, None, "SIGTERM", resume_from=tmp_path)
    assert earlier.exit_status == 143
    assert str(earlier).endswith(f"continue from its newest checkpoint with --resume {tmp_path}")


def test_a_restarted_group_holds_its_own_run_dir_again(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    config = TrainConfig(run_dir=run_dir, overwrite=True)
    with hold_run_dir(config, run_dir, restarted=True):
        pass  # the same run: neither refused nor wiped by --overwrite
    assert (run_dir / "metrics.jsonl").exists()
    refused = pytest.raises(ShardwiseError, match="already holds a run")
    with refused, hold_run_dir(TrainConfig(run_dir=run_dir), run_dir):
        pass
