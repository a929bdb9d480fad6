"""A real run records, per rank, its predicted peak against its measured one (summary.json and
report.md), on the ground of each rank's own measured baseline."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import quick_config, train
from shardwise.memory.footprint import PARTS

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


def test_each_ranks_prediction_and_measured_peak_land_in_the_summary_and_report(
    corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    summary = train(quick_config(corpus, run_dir, max_steps=4), nproc=2)
    memory = summary["memory"]
    assert memory["device"] == "cpu"
    assert memory["mmap_threshold"] is None  # plain data parallel keeps glibc's own allocator
    assert [rank["rank"] for rank in memory["ranks"]] == [0, 1]
    for rank in memory["ranks"]:
        parts = rank["predicted_parts"]
        assert set(PARTS) <= set(parts)
        assert rank["predicted_bytes"] == sum(parts.values())
        # The prediction stands on the rank's own measured start: the same ground.
        assert parts["baseline"] == rank["baseline_bytes"] > 0
        assert rank["peak_bytes"] > rank["baseline_bytes"]
        assert rank["peak_since_start"] is True  # the kernel let the peak start afresh
        measured = rank["peak_bytes"]
        assert rank["error"] == round((rank["predicted_bytes"] - measured) / measured, 4)
        above = measured - rank["baseline_bytes"]
        assert rank["error_above_baseline"] == round(
            (rank["predicted_bytes"] - rank["baseline_bytes"] - above) / above, 4
        )
        assert 1 <= rank["worst_batch"]["step"] <= 4 and rank["worst_batch"]["rows"] == 4
    report = (run_dir / "report.md").read_text()
    section = report[report.index("## Memory per rank") :]
    assert "| rank | predicted | measured (peak resident) | error | above baseline |" in section
    assert section.count("\n| 0 |") == 1 and section.count("\n| 1 |") == 1
