"""Per-step metrics: one JSON object a line in `metrics.jsonl`, mirrored to TensorBoard.

    with MetricsWriter(run_dir) as metrics:
        metrics.log({"step": 10, "loss": 2.31, "rank_step_time_s": [0.10, 0.11]})

Rank 0 only. The JSONL file is the record the report is built from; TensorBoard is a view of
it and is skipped when the `tensorboard` package is not installed. A failure to write (disk
full, permissions) is logged once and disables that output; it never stops training.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from shardwise.report.summary import json_value

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Append metric rows to `run_dir/metrics.jsonl` and, optionally, TensorBoard.

        with MetricsWriter(Path("runs/exp1"), tensorboard=False) as metrics:
            metrics.log({"step": 1, "loss": 2.9, "tokens_per_s": 40_000.0})

    Each row needs a "step". Scalars become one TensorBoard scalar each; a list is read as one
    value per rank and becomes `name/rank0`, `name/rank1`, ... Strings go to JSON only.
    Reopening the same run directory (a resumed run) appends to the same file.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._file = self._open_jsonl()
        self._tensorboard = self._open_tensorboard() if tensorboard else None

    @property
    def tensorboard_enabled(self) -> bool:
        """Whether rows are also written as TensorBoard scalars."""
        return self._tensorboard is not None

    def log(self, row: Mapping[str, Any]) -> None:
        """Write one row: at least {"step": int}, plus scalars and per-rank lists.

        metrics.log({"step": 5, "loss": 2.7, "lr": 3e-4})
        metrics.log({"step": 5, "rank_rss_bytes": [1_200_000_000, 1_150_000_000]})
        """
        if "step" not in row:
            raise ValueError(f"metrics row needs a 'step' key, got keys {sorted(row)}")
        plain = {key: _plain(value) for key, value in row.items()}
        if self._file is not None:
            self._write_jsonl(plain)
        if self._tensorboard is not None:
            self._write_tensorboard(plain)

    def close(self) -> None:
        """Flush and close both outputs; safe to call twice."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError as error:
                log.warning("could not close %s: %s", self.path, error)
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _open_jsonl(self) -> Any:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a link here (refused before training, see run_dir.py) is never
            # appended through; opening it fails and metrics are not saved.
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
            file = os.fdopen(os.open(self.path, flags, 0o644), "a+", encoding="utf-8")
            # A killed run can leave a last line without its newline; start a fresh line so
            # the resumed run's first row is not glued onto it.
            if not _ends_with_newline(file.fileno()):
                file.write("\n")
            return file
        except OSError as error:
            log.warning("metrics will not be saved: cannot open %s: %s", self.path, error)
            return None

    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None  # tensorboard is an optional extra
        except Exception as error:  # a broken install (e.g. protobuf clash) must not stop a run
            log.warning("TensorBoard disabled: importing it failed: %s", error)
            return None
        folder = self.run_dir / TENSORBOARD_DIR
        if folder.is_symlink():  # refused before training (run_dir.py); never written through
            log.warning("TensorBoard disabled: %s is a symbolic link", folder)
            return None
        try:
            # A short flush interval so a killed run keeps nearly everything it logged.
            return SummaryWriter(log_dir=str(folder), flush_secs=10)
        except OSError as error:
            log.warning("TensorBoard disabled: %s", error)
            return None

    def _write_jsonl(self, row: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(row) + "\n")
            # Flush each row: rows are few (one per logging step) and a killed run keeps them.
            self._file.flush()
        except OSError as error:
            log.warning("metrics stop being saved at step %s: %s", row["step"], error)
            self._file = None

    def _write_tensorboard(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        try:
            for key, value in row.items():
                if key == "step":
                    continue
                if isinstance(value, list):
                    for rank, item in enumerate(value):
                        if _is_number(item):
                            self._tensorboard.add_scalar(f"{key}/rank{rank}", item, step)
                elif _is_number(value):
                    self._tensorboard.add_scalar(key, value, step)
        except OSError as error:
            log.warning("TensorBoard disabled at step %s: %s", step, error)
            self._tensorboard = None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All rows of `run_dir/metrics.jsonl`, oldest first; [] if there is no file.

        rows = read_metrics(Path("runs/exp1"))
        losses = [row["loss"] for row in rows if "loss" in row]

    A line cut short by a killed run is skipped. A resumed run re-logs the steps it redoes,
    so a step can appear twice; the later row is the one that belongs to the final run.
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # The last line is routinely truncated by a kill; one in the middle is the same
            # thing followed by a resume. Either way the rest of the file is still good.
            log.debug("skipping unreadable line %d of %s", number, path)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _plain(value: Any) -> Any:
    # Tensors and numpy values become Python numbers once, for both JSON and TensorBoard.
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, str | int | float):
        return value
    return json_value(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _ends_with_newline(descriptor: int) -> bool:
    # Read through the open file, not its name: the name could be swapped for a link since.
    size = os.fstat(descriptor).st_size
    return size == 0 or os.pread(descriptor, 1, size - 1) == b"\n"
