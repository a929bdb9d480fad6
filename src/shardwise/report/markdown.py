"""`report.md`: one page per run with the summary, per-rank figures, plots, sample and config.

    plots = plot_metrics(run_dir)
    write_report(run_dir, summary, plots)   # runs/exp1/report.md

Renders on GitHub and in any markdown viewer; plot links are relative, so the run directory
can be moved or copied whole.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shardwise.report.metrics import read_metrics
from shardwise.report.summary import (
    KNOWN_KEYS,
    format_bytes,
    format_traffic,
    summary_rows,
    sync_shares,
)
from shardwise.safe_write import replace_file

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
CONFIG_FILE = "config.toml"


def write_report(run_dir: Path, summary: Mapping[str, Any], plots: Sequence[Path]) -> Path | None:
    """Write `run_dir/report.md` atomically; return its path, or None if it could not be written.

        path = write_report(Path("runs/exp1"), {"steps": 400}, [Path("runs/exp1/loss.png")])
        print(path.read_text())

    Per-rank mean step times come from `metrics.jsonl`; the config from `config.toml`, when
    either exists. A failure to write is logged rather than failing a finished run.
    """
    run_dir = Path(run_dir)
    path = run_dir / REPORT_FILE
    try:
        return replace_file(path, render_report(run_dir, summary, plots))
    except OSError as error:
        log.warning("could not write %s: %s", path, error)
        return None


def render_report(run_dir: Path, summary: Mapping[str, Any], plots: Sequence[Path]) -> str:
    """The text of `report.md` (see `write_report`).

    text = render_report(Path("runs/exp1"), {"steps": 400}, [])
    assert text.startswith("# Run report")
    """
    run_dir = Path(run_dir)
    sections = [
        f"# Run report: {run_dir.name}",
        _summary_section(summary),
        _rank_section(summary, read_metrics(run_dir)),
        _memory_section(summary.get("memory")),
        _plots_section(run_dir, plots),
        _block_section("Sample", summary.get("sample_text"), "text"),
        _block_section("Config", _read_config(run_dir), "toml"),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _summary_section(summary: Mapping[str, Any]) -> str:
    rows = summary_rows(summary)
    rows += [
        (key, _scalar(value))
        for key, value in summary.items()
        if key not in KNOWN_KEYS and isinstance(value, str | int | float)
    ]
    if not rows:
        return ""
    return "## Summary\n\n" + _table(("metric", "value"), rows)


def _scalar(value: str | float) -> str:
    if isinstance(value, bool | str):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _rank_section(summary: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]) -> str:
    peak = summary.get("peak_rss_bytes")
    peak = peak if isinstance(peak, list) else []
    step_times = _mean_per_rank(metrics, "rank_step_time_s")
    sent = summary.get("sync_bytes_per_step") or []
    columns = [
        (title, column)
        for title, column in (
            ("peak memory", [format_bytes(n) for n in peak]),
            ("mean step time", [f"{seconds:.4f} s" for seconds in step_times]),
            ("sync bytes/step", [format_traffic(n) for n in sent]),
            ("sync share of time", [f"{share:.1%}" for share in sync_shares(summary)]),
        )
        if column
    ]
    if not columns:
        return ""
    header = ["rank", *(title for title, _ in columns)]
    rows = [
        (str(rank), *(column[rank] if rank < len(column) else "" for _, column in columns))
        for rank in range(max(len(column) for _, column in columns))
    ]
    return "## Per rank\n\n" + _table(header, rows)


def _memory_section(memory: Any) -> str:
    """Each rank's predicted peak against its measured one, and the parts of the prediction."""
    if not isinstance(memory, Mapping) or not memory.get("ranks"):
        return ""
    measured = "peak allocated" if memory.get("device") == "cuda" else "peak resident"
    header = ["rank", "predicted", f"measured ({measured})", "error", "above baseline"]
    header += ["worst batch", "predicted parts"]
    rows = []
    for rank in memory["ranks"]:
        batch = rank["worst_batch"]
        parts = ", ".join(
            f"{part} {format_bytes(size)}" for part, size in rank["predicted_parts"].items() if size
        )
        rows.append(
            (
                str(rank["rank"]),
                format_bytes(rank["predicted_bytes"]),
                format_bytes(rank["peak_bytes"]),
                _signed(rank["error"]),
                _signed(rank["error_above_baseline"]),
                f"{batch['rows']} x {batch['width']} at step {batch['step']}",
                parts,
            )
        )
    note = (
        "Predicted before training from a profile and the worst planned batch; the baseline "
        "part is each rank's own process at its start, measured, so both stand on the same "
        "ground. Error: (predicted - measured) / measured; above baseline: of what training "
        "added to the baseline."
    )
    return "## Memory per rank\n\n" + note + "\n\n" + _table(header, rows)


def _signed(share: float | None) -> str:
    return "" if share is None else f"{share:+.1%}"


def _plots_section(run_dir: Path, plots: Sequence[Path]) -> str:
    if not plots:
        return ""
    links = []
    for plot in plots:
        relative = Path(os.path.relpath(Path(plot).resolve(), run_dir.resolve())).as_posix()
        title = Path(plot).stem.replace("_", " ")
        links.append(f"![{title}]({relative})")
    return "## Plots\n\n" + "\n\n".join(links)


def _block_section(title: str, text: Any, language: str) -> str:
    if not text:
        return ""
    text = str(text).rstrip("\n")
    # A fence longer than any run of backticks inside, so the text cannot close it early.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"## {title}\n\n{fence}{language}\n{text}\n{fence}"


def _read_config(run_dir: Path) -> str | None:
    path = run_dir / CONFIG_FILE
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        log.warning("report leaves out the config: cannot read %s: %s", path, error)
        return None


def _mean_per_rank(metrics: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    totals: list[float] = []
    counts: list[int] = []
    for row in metrics:
        values = row.get(key)
        if not isinstance(values, list):
            continue
        missing = len(values) - len(totals)
        totals += [0.0] * missing
        counts += [0] * missing
        for rank, value in enumerate(values):
            if isinstance(value, int | float):
                totals[rank] += value
                counts[rank] += 1
    return [
        total / count if count else float("nan")
        for total, count in zip(totals, counts, strict=True)
    ]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [_table_row(header), "|" + "---|" * len(header)]
    lines += [_table_row(row) for row in rows]
    return "\n".join(lines)


def _table_row(cells: Sequence[str]) -> str:
    escaped = (cell.replace("|", "\\|").replace("\n", "<br>") for cell in cells)
    return "| " + " | ".join(escaped) + " |"
