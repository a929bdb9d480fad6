from __future__ import annotations

from pathlib import Path

from shardwise.report.metrics import MetricsWriter
from shardwise.report.plots import plot_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _log(run_dir: Path, rows: list[dict]) -> None:
    with MetricsWriter(run_dir, tensorboard=False) as metrics:
        for row in rows:
            metrics.log(row)


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    _log(
        tmp_path,
        [
            {
                "step": step,
                "loss": 3.0 - 0.1 * step,
                "lr": 1e-3,
                "tokens_per_s": 1000.0 + step,
                "rank_step_time_s": [0.1, 0.12],
            }
            for step in range(1, 6)
        ],
    )

    paths = plot_metrics(tmp_path)

    assert [path.name for path in paths] == ["loss.png", "throughput.png", "rank_step_time.png"]
    for path in paths:
        assert path.parent == tmp_path
        assert path.stat().st_size > 0
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_metrics_never_logged_get_no_plot(tmp_path: Path) -> None:
    _log(tmp_path, [{"step": 1, "tokens_per_s": 10.0}, {"step": 2, "tokens_per_s": float("nan")}])
    assert [path.name for path in plot_metrics(tmp_path)] == ["throughput.png"]


def test_no_rows_means_no_plots(tmp_path: Path) -> None:
    assert plot_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_metrics(tmp_path) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.jsonl"]
