"""The end-of-run summary: `summary.json` for tools, a few aligned lines for people.

    path = write_summary(run_dir, {"steps": 400, "tokens": 3_276_800, "eval_loss": 2.45})
    print(format_summary(json.loads(path.read_text())))

Every key is optional: a key that is missing (or None) is left out of the text, so a run
that stopped early or skipped evaluation still gets a summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shardwise.safe_write import replace_file

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"

# The keys `summary_rows` knows how to present; any other scalar key is shown as-is by the
# markdown report.
KNOWN_KEYS = frozenset(
    {
        "run_dir", "world_size", "device", "steps", "tokens", "tokens_per_s", "wall_time_s",
        "final_train_loss", "eval_loss", "peak_rss_bytes", "padding_fraction", "imbalance",
        "wait_fraction", "data_notes", "sample_text", "sync", "eval_tokens",
        "eval_tokens_available", "eval_s", "memory",
    }
)  # fmt: skip

# Past this many ranks a per-rank list stops being readable on one line; the markdown report
# has the full per-rank table.
_MAX_RANKS_INLINE = 4


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path | None:
    """Write `summary` to `run_dir/summary.json` atomically; return its path, or None on failure.

        path = write_summary(Path("runs/exp1"), {"steps": 400, "final_train_loss": 2.31})
        assert json.loads(path.read_text())["steps"] == 400

    A reader never sees a half-written file. A failure to write (disk full, permissions) is
    logged and returns None rather than failing a run whose training already finished.
    """
    text = json.dumps(summary, indent=2, default=json_value) + "\n"
    try:
        return replace_file(Path(run_dir) / SUMMARY_FILE, text)
    except OSError as error:
        log.warning("could not write %s: %s", Path(run_dir) / SUMMARY_FILE, error)
        return None


def json_value(value: Any) -> Any:
    """Turn numpy/torch scalars and arrays into plain Python for `json.dumps(default=...)`.

    json.dumps({"loss": torch.tensor(2.3)}, default=json_value)   # '{"loss": 2.299...}'
    json.dumps({"out": Path("runs/x")}, default=json_value)       # '{"out": "runs/x"}'
    """
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable: {value!r}")


def format_summary(summary: Mapping[str, Any]) -> str:
    """A short human summary of a run: aligned `label  value` lines, then the sample text.

    print(format_summary({"world_size": 2, "device": "cpu", "eval_loss": 2.45}))
    # ranks      2 on cpu
    # eval loss  2.4500  (perplexity 11.59)
    """
    rows = summary_rows(summary)
    width = max((len(label) for label, _ in rows), default=0)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    sample = summary.get("sample_text")
    if sample:
        lines += ["Sample:", textwrap.indent(str(sample).rstrip("\n"), "    ", lambda _: True)]
    return "\n".join(lines)


def summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The summary's known scalars as (label, formatted value), skipping missing keys.

    summary_rows({"steps": 400, "tokens": 3_276_800})
    # [("steps", "400  (3,276,800 tokens)")]
    """
    get = summary.get
    rows: list[tuple[str, str]] = []

    def add(label: str, value: str | None) -> None:
        if value:
            rows.append((label, value))

    add("run", _text(get("run_dir")))
    if get("world_size") is None:
        add("device", _text(get("device")))
    else:
        add("ranks", _joined(_count(get("world_size")), _text(get("device")), sep=" on "))
    # Tokens and throughput ride along in parentheses when their main figure is there.
    if get("steps") is None:
        add("tokens", _count(get("tokens")))
    else:
        add("steps", _joined(_count(get("steps")), _paren(_count(get("tokens")), "tokens")))
    if get("wall_time_s") is None:
        add("tokens/s", _rate(get("tokens_per_s")))
    else:
        add(
            "time",
            _joined(_duration(get("wall_time_s")), _paren(_rate(get("tokens_per_s")), "tok/s")),
        )
    add("train loss", _loss(get("final_train_loss")))
    eval_loss = get("eval_loss")
    if eval_loss is not None:
        add("eval loss", f"{_loss(eval_loss)}  (perplexity {format_perplexity(eval_loss)})")
    held_out = _held_out(get("eval_tokens"), get("eval_tokens_available"))
    seconds = get("eval_s")
    # eval_s sums every evaluation's time; eval_tokens is one evaluation's count.
    spent = f" each; {seconds:.1f}s evaluating in all" if seconds else ""
    add("eval tokens", held_out and held_out + spent)
    add("peak memory", _per_rank_bytes(get("peak_rss_bytes")))
    add("predicted", _predicted(get("memory")))
    add("padding", _percent(get("padding_fraction")))
    add("imbalance", _number(get("imbalance")))
    wait = _percent(get("wait_fraction"))
    add("wait", wait and f"{wait} of step time waiting for peers")
    add("sync", _sync(summary, wait))
    add("staleness", _histogram(get("sync_staleness_histogram")))
    lost = get("sync_workers_lost")
    if lost:
        add("lost", "; ".join(f"worker {rank} {why}" for rank, why in lost.items()))
    add("data", _notes(get("data_notes")))
    return rows


def _predicted(memory: Any) -> str | None:
    """The prediction of the rank predicted highest, against what it measured.

    _predicted({"ranks": [{"rank": 0, "predicted_bytes": 2**30, "peak_bytes": 2**30 * 1.1,
                           "error": -0.09}]})   # "1.00 GiB on rank 0 (measured 1.10 GiB, -9.1%)"
    """
    if not isinstance(memory, Mapping) or not memory.get("ranks"):
        return None
    top = max(memory["ranks"], key=lambda rank: rank["predicted_bytes"])
    error = "" if top["error"] is None else f", {top['error']:+.1%}"
    return (
        f"{format_bytes(top['predicted_bytes'])} on rank {top['rank']} "
        f"(measured {format_bytes(top['peak_bytes'])}{error})"
    )


def perplexity(loss: float) -> float:
    """exp(loss), the per-token perplexity of a mean cross-entropy loss; inf where that overflows.

    perplexity(2.0)     # 7.389...
    perplexity(1000.0)  # inf
    """
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def format_perplexity(loss: float) -> str:
    """Perplexity of `loss` as text: 2 decimals, scientific when huge, "inf" on overflow.

    format_perplexity(2.45)   # "11.59"
    format_perplexity(30.0)   # "1.07e+13"
    """
    ppl = perplexity(float(loss))
    if math.isinf(ppl):
        return "inf (overflow)"
    return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.3g}"


def format_bytes(n: float) -> str:
    """A byte count in MiB below 1 GiB, otherwise in GiB.

    format_bytes(512 * 2**20)   # "512.0 MiB"
    format_bytes(3 * 2**30)     # "3.00 GiB"
    """
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def format_traffic(n: float) -> str:
    """A payload size: bytes below 1 KiB, KiB below 1 MiB, then as `format_bytes`.

    format_traffic(800)        # "800 B"
    format_traffic(49_152)     # "48.0 KiB"
    """
    if n < 2**10:
        return f"{n:.0f} B"
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else format_bytes(n)


def sync_shares(summary: Mapping[str, Any]) -> list[float]:
    """Per rank, the share of its step time spent in synchronisation ([] if not recorded).

    sync_shares({"sync_time_s": [1.0, 3.0], "compute_time_s": [3.0, 1.0]})   # [0.25, 0.75]
    """
    sync, compute = summary.get("sync_time_s") or [], summary.get("compute_time_s") or []
    return [s / (s + c) if s + c > 0 else 0.0 for s, c in zip(sync, compute, strict=True)]


def format_duration(seconds: float) -> str:
    """Seconds as `4.2s`, `42s`, `1m05s` or `2h03m10s`; "?" when unknown.

    format_duration(65)     # "1m05s"
    format_duration(7390)   # "2h03m10s"
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 10:
        return f"{seconds:.1f}s"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# Each formatter below returns None for a missing value, so callers can drop the line.


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _count(value: Any) -> str | None:
    return None if value is None else f"{value:,}"


def _held_out(evaluated: Any, available: Any) -> str | None:
    if evaluated is None:
        return None
    if available is None or available == evaluated:
        return f"{evaluated:,}"
    return f"{evaluated:,} of {available:,} held out"


def _rate(value: Any) -> str | None:
    return None if value is None else f"{value:,.0f}"


def _loss(value: Any) -> str | None:
    return None if value is None else f"{value:.4f}"


def _percent(value: Any) -> str | None:
    return None if value is None else f"{value:.1%}"


def _number(value: Any) -> str | None:
    if value is None:
        return None
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _duration(value: Any) -> str | None:
    return None if value is None else format_duration(value)


def _notes(value: Any) -> str | None:
    if not value:
        return None
    return value if isinstance(value, str) else "; ".join(map(str, value))


def _sync(summary: Mapping[str, Any], wait: str | None = None) -> str | None:
    # The strategy, then the mean rank's payload per step and the share of all ranks' time
    # (left out where it is the wait share just printed: under DDP the two are one wait).
    sent, sync = summary.get("sync_bytes_per_step"), summary.get("sync_time_s")
    if sent and not any(sent) and (summary.get("world_size") or 1) > 1:
        return "none: one replica (stages and split layers exchange activations, not gradients)"
    compute = summary.get("compute_time_s") or []
    total = sum(sync or []) + sum(compute)
    share = f"{sum(sync or []) / total:.1%}" if total > 0 else None
    return _joined(
        _text(summary.get("sync")),
        f"{format_traffic(sum(sent) / len(sent))}/step a rank" if sent else None,
        f"{share} of step time" if share is not None and share != wait else None,
        sep=", ",
    )


def _histogram(value: Any) -> str | None:
    if not value:
        return None
    return ", ".join(f"{key}: {count:,}" for key, count in value.items())


def _paren(value: str | None, unit: str) -> str | None:
    return None if value is None else f"({value} {unit})"


def _joined(*parts: str | None, sep: str = "  ") -> str | None:
    present = [part for part in parts if part]
    return sep.join(present) or None


def _per_rank_bytes(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        return format_bytes(value)
    if not value:
        return None
    if len(value) <= _MAX_RANKS_INLINE:
        return ", ".join(format_bytes(n) for n in value)
    high = max(range(len(value)), key=value.__getitem__)
    low = min(range(len(value)), key=value.__getitem__)
    return (
        f"max {format_bytes(value[high])} (rank {high}), "
        f"min {format_bytes(value[low])} (rank {low})"
    )
