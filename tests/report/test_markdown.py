from __future__ import annotations

from pathlib import Path

from shardwise.report.markdown import write_report
from shardwise.report.metrics import MetricsWriter

SUMMARY = {
    "steps": 400,
    "tokens": 3_276_800,
    "eval_loss": 2.0,
    "peak_rss_bytes": [2**30, 512 * 2**20],
    "strategy": "pipeline",
    "parameters": 123456,
    "sample_text": "the cat sat",
}


def test_report_has_tables_plot_links_sample_and_config(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as metrics:
        metrics.log({"step": 1, "rank_step_time_s": [0.1, 0.3]})
        metrics.log({"step": 2, "rank_step_time_s": [0.3, 0.5]})
    (tmp_path / "config.toml").write_text('[model]\nkind = "lstm"\n')
    plots = [tmp_path / "loss.png", tmp_path / "throughput.png"]

    path = write_report(tmp_path, SUMMARY, plots)

    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert text.startswith(f"# Run report: {tmp_path.name}\n")
    assert "| steps | 400  (3,276,800 tokens) |" in text
    assert "| eval loss | 2.0000  (perplexity 7.39) |" in text
    assert "| strategy | pipeline |" in text
    assert "| parameters | 123,456 |" in text
    assert "| 0 | 1.00 GiB | 0.2000 s |" in text
    assert "| 1 | 512.0 MiB | 0.4000 s |" in text
    assert "![loss](loss.png)" in text
    assert "![throughput](throughput.png)" in text
    assert "```text\nthe cat sat\n```" in text
    assert '```toml\n[model]\nkind = "lstm"\n```' in text


def test_report_without_metrics_or_config_leaves_those_sections_out(tmp_path: Path) -> None:
    text = write_report(tmp_path, {"steps": 3}, []).read_text()
    assert "| steps | 3 |" in text
    assert "## Per rank" not in text
    assert "## Plots" not in text
    assert "```" not in text
