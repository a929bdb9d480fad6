from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from shardwise.report.summary import (
    format_bytes,
    format_duration,
    format_summary,
    perplexity,
    write_summary,
)

FULL_SUMMARY = {
    "run_dir": "runs/exp1",
    "world_size": 2,
    "device": "cpu",
    "steps": 400,
    "tokens": 3_276_800,
    "tokens_per_s": 41_234.5,
    "wall_time_s": 79.5,
    "final_train_loss": 2.3123,
    "eval_loss": 2.0,
    "peak_rss_bytes": [2**30, 512 * 2**20],
    "padding_fraction": 0.125,
    "imbalance": 1.0833,
    "wait_fraction": 0.05,
    "data_notes": "12 sequences longer than 512 tokens were split",
    "sample_text": "the cat\nsat on",
}


def test_write_summary_writes_the_json_and_leaves_no_temp_files(tmp_path: Path) -> None:
    write_summary(tmp_path, {"steps": 1})
    path = write_summary(tmp_path, FULL_SUMMARY)

    assert path == tmp_path / "summary.json"
    assert json.loads(path.read_text()) == FULL_SUMMARY
    assert os.listdir(tmp_path) == ["summary.json"]


def test_a_failed_write_keeps_the_old_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_summary(tmp_path, {"steps": 1})

    def replace_fails(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", replace_fails)
    assert write_summary(tmp_path, {"steps": 2}) is None
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 1}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_format_summary_shows_every_known_key() -> None:
    text = format_summary(FULL_SUMMARY)

    assert "2 on cpu" in text
    assert "400  (3,276,800 tokens)" in text
    assert "1m20s  (41,234 tok/s)" in text
    assert "2.3123" in text
    assert "2.0000  (perplexity 7.39)" in text  # exp(2.0) = 7.389
    assert "1.00 GiB, 512.0 MiB" in text
    assert "12.5%" in text
    assert "1.08" in text
    assert "5.0%" in text
    assert "12 sequences longer than 512 tokens were split" in text
    assert text.endswith("Sample:\n    the cat\n    sat on")


def test_format_summary_aligns_values() -> None:
    lines = format_summary({"steps": 4, "eval_loss": 1.0}).splitlines()
    assert [line.index("4") for line in lines[:1]] == [lines[1].index("1.0")]


def test_format_summary_leaves_out_missing_keys() -> None:
    assert format_summary({}) == ""
    assert format_summary({"eval_loss": None}) == ""
    text = format_summary({"tokens": 1000, "device": "cuda"})
    assert text.splitlines() == ["device  cuda", "tokens  1,000"]


def test_perplexity_of_a_huge_loss_is_inf_not_an_error() -> None:
    assert perplexity(2.0) == pytest.approx(math.e**2)
    assert perplexity(1e4) == math.inf
    assert "perplexity inf" in format_summary({"eval_loss": 1e4})


def test_many_ranks_show_the_extremes() -> None:
    text = format_summary({"peak_rss_bytes": [2**30] * 7 + [2 * 2**30]})
    assert "max 2.00 GiB (rank 7), min 1.00 GiB (rank 0)" in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(4.24, "4.2s"), (42, "42s"), (65, "1m05s"), (7390, "2h03m10s"), (math.inf, "?")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_bytes() -> None:
    assert format_bytes(512 * 2**20) == "512.0 MiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
