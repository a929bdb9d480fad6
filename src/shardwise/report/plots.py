"""PNG plots of a run's metrics: loss (held-out loss, lr), throughput, per-rank step time.

    paths = plot_metrics(Path("runs/exp1"))   # [runs/exp1/loss.png, runs/exp1/throughput.png, ...]
    write_report(run_dir, summary, paths)

Reads `metrics.jsonl` (see `report.metrics`). Figures are drawn on matplotlib's Agg canvas
without pyplot, so nothing opens a window, no global backend is switched under the user, and
no figure outlives the call.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shardwise.report.metrics import read_metrics
from shardwise.safe_write import replace_file

log = logging.getLogger(__name__)

LOSS_KEY = "loss"
EVAL_LOSS_KEY = "eval_loss"
RANK_STEP_TIME_KEY = "rank_step_time_s"

Series = tuple[list[float], list[float]]


def plot_metrics(run_dir: Path, final_eval: tuple[int, float] | None = None) -> list[Path]:
    """Draw the plots the metrics allow into `run_dir`; return the paths written.

        paths = plot_metrics(Path("runs/exp1"))
        assert all(path.suffix == ".png" for path in paths)

    A plot whose metric was never logged is skipped; no rows means no plots ([]). A plot that
    cannot be saved is logged and skipped. `final_eval`: (step, held-out loss) of the end-of-run
    evaluation, which metrics.jsonl does not hold, drawn on the loss plot.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return []
    if final_eval is not None and final_eval[1] is not None:
        rows = [*rows, {"step": final_eval[0], EVAL_LOSS_KEY: final_eval[1]}]
    # Imported here: matplotlib takes most of a second to import, and every rank imports
    # this package while only rank 0 at the end of a run draws.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    drawers = (
        ("loss.png", _draw_loss),
        ("throughput.png", _draw_throughput),
        ("rank_step_time.png", _draw_rank_step_time),
    )
    written = []
    for name, draw in drawers:
        figure = Figure(figsize=(7, 4), layout="constrained")
        if not draw(figure, rows):
            continue
        figure.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
        path = run_dir / name
        # Drawn into memory, then replaced whole: savefig to a path would write through a link.
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=100)
        try:
            replace_file(path, png.getvalue())
        except OSError as error:
            log.warning("could not write plot %s: %s", path, error)
            continue
        written.append(path)
    return written


def _draw_loss(figure: Any, rows: Sequence[dict[str, Any]]) -> bool:
    if not any(LOSS_KEY in row for row in rows):
        return False
    axes = figure.add_subplot()
    steps, losses = _series(rows, LOSS_KEY)
    axes.plot(steps, losses, label="train loss", color="tab:blue", marker=_few(steps))
    eval_steps, eval_losses = _series(rows, EVAL_LOSS_KEY)  # --eval-every's points
    if eval_steps:
        axes.plot(eval_steps, eval_losses, "o-", label="held-out loss", color="tab:orange")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("Loss")
    handles, labels = axes.get_legend_handles_labels()
    lr_steps, lrs = _series(rows, "lr")
    if lr_steps:
        lr_axes = axes.twinx()
        lr_axes.plot(lr_steps, lrs, "--", label="lr", color="tab:gray")
        lr_axes.set_ylabel("learning rate")
        lr_handles, lr_labels = lr_axes.get_legend_handles_labels()
        handles, labels = handles + lr_handles, labels + lr_labels
    # Below the axes: the two y-axes share the area, so no spot inside is reliably empty.
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    return True


def _draw_throughput(figure: Any, rows: Sequence[dict[str, Any]]) -> bool:
    steps, rates = _series(rows, "tokens_per_s")
    if not steps:
        return False
    axes = figure.add_subplot()
    axes.plot(steps, rates, marker=_few(steps))
    axes.set_xlabel("step")
    axes.set_ylabel("tokens / s")
    axes.set_title("Throughput")
    return True


def _draw_rank_step_time(figure: Any, rows: Sequence[dict[str, Any]]) -> bool:
    per_rank = _rank_series(rows, RANK_STEP_TIME_KEY)
    if not any(steps for steps, _ in per_rank):
        return False
    axes = figure.add_subplot()
    for rank, (steps, times) in enumerate(per_rank):
        if steps:
            axes.plot(steps, times, label=f"rank {rank}", marker=_few(steps))
    axes.set_xlabel("step")
    axes.set_ylabel("step time (s)")
    axes.set_title("Step time per rank")
    # Past a dozen ranks a legend hides the plot; the lines still show the spread.
    if len(per_rank) <= 12:
        axes.legend(loc="best", ncols=2 if len(per_rank) > 4 else 1)
    return True


def _few(steps: Sequence[float]) -> str | None:
    """A marker where a line alone would draw nothing: one point (a run shorter than a row)."""
    return "o" if len(steps) < 3 else None


def _series(rows: Sequence[dict[str, Any]], key: str) -> Series:
    """(steps, values) of one scalar metric; for a repeated step the later row wins."""
    by_step: dict[float, float] = {}
    for row in rows:
        value = row.get(key)
        if _finite(value) and _finite(row.get("step")):
            by_step[row["step"]] = value
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def _rank_series(rows: Sequence[dict[str, Any]], key: str) -> list[Series]:
    """One (steps, values) per rank, list index = rank, from a metric logged as a list."""
    by_rank: list[dict[float, float]] = []
    for row in rows:
        values = row.get(key)
        if not isinstance(values, list) or not _finite(row.get("step")):
            continue
        by_rank.extend({} for _ in range(len(values) - len(by_rank)))
        for rank, value in enumerate(values):
            if _finite(value):
                by_rank[rank][row["step"]] = value
    return [(sorted(points), [points[step] for step in sorted(points)]) for points in by_rank]


def _finite(value: Any) -> bool:
    # Non-finite values (a diverged loss) would wreck the axis limits; leave a gap instead.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
