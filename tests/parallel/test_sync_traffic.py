"""The traffic record every sync strategy keeps, its hook wrappers, and how reports show it.

The bytes real strategies send over real collectives are measured in
tests/distributed/test_sync_traffic.py; here are the pieces that need no process group.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from shardwise.distributed import DistEnv
from shardwise.parallel.sync import SYNC_STRATEGIES, SyncOptions, sync_strategy
from shardwise.parallel.sync.compression import counting
from shardwise.parallel.sync.traffic import SyncTraffic, payload_bytes
from shardwise.report.markdown import render_report
from shardwise.report.summary import format_summary, format_traffic
from shardwise.train.summary import staleness_histogram

ALONE = DistEnv(0, 1, 0, 1, torch.device("cpu"))


def test_traffic_counts_tensors_and_takes_what_came_since_the_last_take() -> None:
    traffic = SyncTraffic()
    traffic.sent(torch.zeros(10))  # 40 bytes of fp32
    traffic.sent(torch.zeros(3, 2, dtype=torch.bfloat16))  # 12 bytes
    assert (traffic.bytes, traffic.exchanges) == (52, 2)
    first = traffic.take()
    assert (first.bytes, first.exchanges, first.seconds) == (52, 2, 0.0)
    traffic.count(100, exchanges=3)
    second = traffic.take()
    assert (second.bytes, second.exchanges) == (100, 3)
    assert (traffic.bytes, traffic.exchanges) == (152, 5)  # the totals are kept
    assert traffic.take().bytes == 0


def test_blocked_time_is_measured_even_when_the_exchange_fails() -> None:
    ticks = iter([1.0, 1.5, 10.0, 12.0])
    traffic = SyncTraffic(clock=lambda: next(ticks))
    with traffic.blocked():
        pass
    with pytest.raises(RuntimeError), traffic.blocked():
        raise RuntimeError("peer gone")
    assert traffic.seconds == pytest.approx(0.5 + 2.0)


def test_payload_bytes_follow_torch_cat_promotion() -> None:
    assert payload_bytes([]) == 0
    assert payload_bytes([torch.zeros(3), torch.zeros(2, 2)]) == 7 * 4
    assert payload_bytes([torch.zeros(4, dtype=torch.bfloat16)]) == 8
    # bf16 and fp16 meet at fp32 in one buffer, as average_parameters' torch.cat makes them.
    mixed = [torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.float16)]
    assert torch.cat(mixed).dtype == torch.float32
    assert payload_bytes(mixed) == 8 * 4


class FakeBucket:
    """What a comm hook reads of DDP's GradBucket here: its flat buffer."""

    def __init__(self, numel: int) -> None:
        self._buffer = torch.ones(numel)

    def buffer(self) -> torch.Tensor:
        return self._buffer


def test_a_counting_hook_adds_each_bucket_at_the_width_it_travels() -> None:
    calls = []

    def hook(state: object, bucket: FakeBucket) -> str:
        calls.append((state, bucket))
        return "future"

    traffic = SyncTraffic()
    plain, half = counting(hook, traffic), counting(hook, traffic, width=2)
    bucket = FakeBucket(1000)
    assert plain("group", bucket) == "future"  # the wrapped hook's own result
    assert traffic.take().bytes == 4000  # the fp32 buffer's bytes
    assert half(None, bucket) == "future"
    assert traffic.take().bytes == 2000
    assert calls == [("group", bucket), (None, bucket)]


def test_a_counting_hook_keeps_the_name_ddp_refuses_bf16_by() -> None:
    wrapped = counting(default_hooks.bf16_compress_hook, SyncTraffic(), width=2)
    assert wrapped.__name__ == "bf16_compress_hook"


@pytest.mark.parametrize("name", sorted(SYNC_STRATEGIES))
def test_every_strategy_starts_with_its_own_empty_traffic(name: str) -> None:
    first, second = sync_strategy(name, SyncOptions()), sync_strategy(name, SyncOptions())
    assert first.traffic == SyncTraffic()
    assert first.traffic is not second.traffic


def test_a_staleness_histogram_alone_and_none_when_never_recorded() -> None:
    assert staleness_histogram(Counter(), highest=-1, env=ALONE) is None
    histogram = staleness_histogram(Counter({0: 5, 2: 1}), highest=2, env=ALONE)
    assert histogram == {"0": 5, "2": 1}


SYNC_SUMMARY = {
    "world_size": 2,
    "sync": "local-sgd",
    "peak_rss_bytes": [2**20, 2**20],
    "sync_bytes_per_step": [12_288.0, 4_096.0],
    "sync_time_s": [1.0, 3.0],
    "compute_time_s": [3.0, 1.0],
    "sync_staleness_histogram": {"0": 120, "3": 4},
}


def test_the_text_summary_shows_strategy_payload_share_and_staleness() -> None:
    text = format_summary(SYNC_SUMMARY)
    assert "local-sgd, 8.0 KiB/step a rank, 50.0% of step time" in text
    assert "0: 120, 3: 4" in text
    assert "sync" not in format_summary({"steps": 3})
    assert (format_traffic(800), format_traffic(3 * 2**20)) == ("800 B", "3.0 MiB")


def test_the_markdown_report_has_per_rank_sync_columns(tmp_path: Path) -> None:
    text = render_report(tmp_path, SYNC_SUMMARY, [])
    assert "| rank | peak memory | sync bytes/step | sync share of time |" in text
    assert "| 0 | 1.0 MiB | 12.0 KiB | 25.0% |" in text
    assert "| 1 | 1.0 MiB | 4.0 KiB | 75.0% |" in text
