"""How a held-out evaluation is shown: its progress lines, the loss plot, the summary rows."""

from __future__ import annotations

import re

import pytest
from matplotlib.figure import Figure

from shardwise.report.markdown import render_report
from shardwise.report.plots import _draw_loss
from shardwise.report.progress import EvalProgress, TrainProgress
from shardwise.report.summary import format_summary


def test_without_a_terminal_an_evaluation_says_it_starts_lives_and_ends(
    not_a_terminal: None, clock: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    with EvalProgress(total_tokens=200_000, step=400) as shown:
        for done in range(20_000, 200_001, 20_000):
            clock[0] += 4.0  # 4 s a batch: a line every ~10 s, not one a batch
            shown.update(done)
        shown.done(2.3456)
    assert capsys.readouterr().out.splitlines() == [
        "evaluating held-out loss at step 400: 0/200,000 tokens",
        "evaluating held-out loss at step 400: 60,000/200,000 tokens",
        "evaluating held-out loss at step 400: 120,000/200,000 tokens",
        "evaluating held-out loss at step 400: 180,000/200,000 tokens",
        "eval loss 2.3456 at step 400 (200,000 held-out tokens, 40s)",
    ]


def test_a_disabled_evaluation_display_prints_nothing(
    not_a_terminal: None, capsys: pytest.CaptureFixture[str]
) -> None:
    progress = TrainProgress(total_steps=4, enabled=False)
    with progress, progress.evaluation(total_tokens=100, step=2) as shown:
        shown.update(100)
        shown.done(1.0)
    assert capsys.readouterr().out == ""


def test_in_a_terminal_the_evaluation_bar_joins_the_training_bar(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.setenv("COLUMNS", "160")  # room for both bars whole
    with TrainProgress(total_steps=10) as progress:
        progress.update(5, loss=2.31, tokens_per_s=41_200.0)
        with progress.evaluation(total_tokens=3_000, step=5) as shown:
            shown.update(1_500)
            progress._progress.refresh()  # what the refresh thread would draw meanwhile
            shown.done(2.5)
        assert len(progress._progress.tasks) == 1  # the evaluation's bar is gone again
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().out)  # colours off
    assert "evaluating held-out loss" in out
    assert "1500/3000 tokens" in out
    assert "eval loss 2.5000 at step 5 (3,000 held-out tokens" in out
    assert "loss 2.31" in out


def test_the_loss_plot_draws_the_held_out_points() -> None:
    rows = [{"step": step, "loss": 3.0 - 0.1 * step} for step in range(1, 7)]
    rows[1]["eval_loss"] = 2.9
    rows[3]["eval_loss"] = 2.7
    figure = Figure()
    assert _draw_loss(figure, rows)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert list(lines["held-out loss"].get_xdata()) == [2, 4]
    assert list(lines["held-out loss"].get_ydata()) == [2.9, 2.7]


def test_summary_and_report_say_how_many_held_out_tokens_were_evaluated(tmp_path) -> None:
    summary = {"eval_loss": 2.0, "eval_tokens": 200_000, "eval_tokens_available": 10_600_000}
    assert "eval tokens  200,000 of 10,600,000 held out" in format_summary(summary)
    report = render_report(tmp_path, summary, [])
    assert "| eval tokens | 200,000 of 10,600,000 held out |" in report
    assert "eval_tokens" not in report  # shown once, by its label
    alone = format_summary({**summary, "eval_tokens_available": 200_000})
    assert alone.endswith("eval tokens  200,000")


def test_the_end_of_run_evaluation_is_on_the_loss_plot_and_a_short_run_draws_points(
    tmp_path,
) -> None:
    from matplotlib.figure import Figure

    from shardwise.report.plots import plot_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "loss": 3.1, "tokens_per_s": 10.0}\n')
    assert {path.name for path in plot_metrics(tmp_path, (3, 2.8))} >= {"loss.png"}
    rows = [{"step": 3, "loss": 3.1}, {"step": 3, "eval_loss": 2.8}]
    figure = Figure()
    assert _draw_loss(figure, rows)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert list(lines["held-out loss"].get_ydata()) == [2.8]
    assert lines["train loss"].get_marker() == "o"  # one row: a point, not an empty axis
