"""What a user sees of a run: metrics, progress, summary, plots and the markdown report.

    with MetricsWriter(run_dir) as metrics, TrainProgress(total_steps=400) as progress:
        ...  # metrics.log(row); progress.update(step, loss, tokens_per_s)

Rank 0 only; the caller guarantees that. Nothing here stops a run over a reporting problem
(a full disk, a closed pipe, a missing optional package): it is logged and skipped. Heavy
imports (matplotlib, TensorBoard, rich) happen only when they are used.
"""

from __future__ import annotations

from shardwise.report.markdown import write_report
from shardwise.report.metrics import MetricsWriter, read_metrics
from shardwise.report.plots import plot_metrics
from shardwise.report.progress import TrainProgress
from shardwise.report.summary import format_summary, perplexity, write_summary

__all__ = [
    "MetricsWriter",
    "TrainProgress",
    "format_summary",
    "perplexity",
    "plot_metrics",
    "read_metrics",
    "write_report",
    "write_summary",
]
