from __future__ import annotations

import pytest

from shardwise.report.progress import TrainProgress


def test_without_a_terminal_prints_a_line_every_tenth(
    not_a_terminal: None, clock: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    with TrainProgress(total_steps=40) as progress:
        assert not progress.live
        for step in range(1, 41):
            clock[0] = float(step)  # one step per second
            progress.update(step, loss=2.5, tokens_per_s=41_200.0)

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10
    assert lines[0] == "step 4/40 loss 2.5 tok/s 41,200 eta 36s"
    assert lines[1] == "step 8/40 loss 2.5 tok/s 41,200 eta 32s"
    assert lines[-1] == "step 40/40 loss 2.5 tok/s 41,200 elapsed 40s"


def test_resumed_run_counts_from_start_step(
    not_a_terminal: None, clock: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    with TrainProgress(total_steps=400, start_step=100) as progress:
        clock[0] = 10.0
        progress.update(119, loss=None, tokens_per_s=None)  # between marks: silent
        progress.update(120, loss=None, tokens_per_s=None)
        progress.update(120, loss=None, tokens_per_s=None)  # same step again: silent
        progress.update(395, loss=1.0, tokens_per_s=None)  # last update before the end
        progress.update(400, loss=1.0, tokens_per_s=None)

    assert capsys.readouterr().out.splitlines() == [
        "step 120/400 eta 2m20s",
        "step 395/400 loss 1 eta 0.2s",
        "step 400/400 loss 1 elapsed 10s",
    ]


def test_disabled_prints_nothing(not_a_terminal: None, capsys: pytest.CaptureFixture[str]) -> None:
    with TrainProgress(total_steps=10, enabled=False) as progress:
        for step in range(1, 11):
            progress.update(step, loss=1.0, tokens_per_s=1.0)
    assert capsys.readouterr().out == ""


def test_update_outside_the_context_manager_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        TrainProgress(total_steps=10).update(1, loss=None, tokens_per_s=None)


def test_terminal_shows_the_live_bar(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    with TrainProgress(total_steps=10) as progress:
        assert progress.live
        progress.update(5, loss=2.31, tokens_per_s=41_200.0)
    out = capsys.readouterr().out
    assert "5/10" in out
    assert "2.31" in out
