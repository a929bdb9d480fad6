from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shardwise.report.metrics import METRICS_FILE, MetricsWriter, read_metrics


def test_rows_round_trip_with_per_rank_lists_and_tensor_values(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as metrics:
        metrics.log({"step": 1, "loss": torch.tensor(2.5), "rank_step_time_s": [0.1, 0.11]})
        metrics.log({"step": 2, "lr": np.float32(0.5), "rank_rss_bytes": [np.int64(7), 8]})

    assert read_metrics(tmp_path) == [
        {"step": 1, "loss": 2.5, "rank_step_time_s": [0.1, 0.11]},
        {"step": 2, "lr": 0.5, "rank_rss_bytes": [7, 8]},
    ]


def test_each_row_is_on_disk_before_close(tmp_path: Path) -> None:
    metrics = MetricsWriter(tmp_path, tensorboard=False)
    metrics.log({"step": 1, "loss": 3.0})
    # A killed run never reaches close(); its rows must already be in the file.
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.0}]
    metrics.close()
    metrics.close()


def test_a_truncated_last_line_is_skipped(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as metrics:
        metrics.log({"step": 1, "loss": 3.0})
        metrics.log({"step": 2, "loss": 2.9})
    with (tmp_path / METRICS_FILE).open("a") as file:
        file.write('{"step": 3, "lo')

    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]


def test_reopening_appends_even_after_a_truncated_line(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as metrics:
        metrics.log({"step": 1, "loss": 3.0})
    with (tmp_path / METRICS_FILE).open("a") as file:
        file.write('{"step": 2, "lo')  # killed mid-write

    with MetricsWriter(tmp_path, tensorboard=False) as metrics:
        metrics.log({"step": 2, "loss": 2.9})

    assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.9}]


def test_no_metrics_file_reads_as_no_rows(tmp_path: Path) -> None:
    assert read_metrics(tmp_path) == []


def test_a_row_without_step_is_a_bug(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as metrics, pytest.raises(ValueError):
        metrics.log({"loss": 3.0})


def test_an_unwritable_run_dir_does_not_stop_logging_calls(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with MetricsWriter(not_a_dir, tensorboard=False) as metrics:
        metrics.log({"step": 1, "loss": 3.0})


def test_tensorboard_writes_one_scalar_per_rank(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    with MetricsWriter(tmp_path) as metrics:
        assert metrics.tensorboard_enabled
        metrics.log({"step": 1, "loss": 3.0, "note": "x", "rank_step_time_s": [0.1, 0.2]})

    event_files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    assert event_files[0].stat().st_size > 0
    tags = {
        value.tag
        for event in EventFileLoader(str(event_files[0])).Load()
        for value in event.summary.value
    }
    assert tags == {"loss", "rank_step_time_s/rank0", "rank_step_time_s/rank1"}


def test_tensorboard_off_writes_no_event_files(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as metrics:
        metrics.log({"step": 1, "loss": 3.0})
        assert not metrics.tensorboard_enabled
    assert not (tmp_path / "tensorboard").exists()


def test_missing_tensorboard_package_is_skipped_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes the import raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with MetricsWriter(tmp_path) as metrics:
        metrics.log({"step": 1, "loss": 3.0})
        assert not metrics.tensorboard_enabled
    assert json.loads((tmp_path / METRICS_FILE).read_text()) == {"step": 1, "loss": 3.0}
