"""Metrics rows and run totals from per-rank step times, without processes."""

from __future__ import annotations

import pytest
import torch

from shardwise.data.batch import collate
from shardwise.parallel.sync import SyncTraffic
from shardwise.train.accounting import RunTotals, Window, imbalance, imbalance_of, step_spread


def test_imbalance_is_slowest_over_mean_summed_over_steps() -> None:
    assert imbalance([[1.0, 2.0], [1.0, 1.0]]) == pytest.approx(1.2)
    assert imbalance([[1.0, 1.0], [1.0, 1.0]]) == pytest.approx(1.0)
    # Summed over steps, not averaged per step: (1 + 3) / (1 + 2), where a mean of ratios is 1.25.
    assert imbalance([[1.0, 3.0], [1.0, 1.0]]) == pytest.approx(4 / 3)
    assert step_spread([[1.0, 3.0], [1.0, 1.0]]) == (4.0, 3.0)


def test_nothing_timed_is_balanced() -> None:
    assert imbalance([[], []]) == 1.0
    assert imbalance_of(0.0, 0.0) == 1.0


def _window(
    started: float, compute: list[float], wait: list[float], costs: list[float] | None
) -> Window:
    window = Window(started=started)
    for c, w in zip(compute, wait, strict=True):
        window.record_step(c, w, costs)
    return window


def test_a_window_becomes_one_row_over_all_ranks() -> None:
    window = _window(10.0, [1.0, 2.0], [0.5, 0.0], costs=[3.0, 1.0])
    window.grad_norm = torch.tensor(0.25)
    traffic = SyncTraffic(bytes=4000, exchanges=2, seconds=0.25)
    # memory, then the traffic (bytes, exchanges, exchange seconds), then per-step times
    mine = window.timings(memory_bytes=100.0, traffic=traffic)
    assert mine == [100.0, 4000, 2, 0.25, 1.0, 2.0, 0.5, 0.0]
    other_rank = [200.0, 1000.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.5]
    figures = window.close([60.0, 30.0, 40.0], [mine, other_rank], now=13.0)

    assert figures.row(step=4, lr=1e-3) == {
        "step": 4,
        "loss": 2.0,  # 60 / 30 tokens
        "lr": 1e-3,
        "grad_norm": 0.25,
        "tokens_per_s": 10.0,  # 30 tokens in 13 - 10 seconds
        "padding_fraction": 0.25,  # 30 of 40 slots
        "imbalance": pytest.approx((1 + 2) / (1 + 1.5)),
        "predicted_imbalance": 1.5,  # 3 / mean(3, 1) on both steps
        "rank_step_time_s": [(3.0 + 0.5) / 2, (2.0 + 1.5) / 2],
        "rank_wait_s": [0.5, 1.5],
        "rank_rss_bytes": [100, 200],
        "sync_bytes_per_step": [2000.0, 500.0],  # over the window's 2 steps
        # The exchange seconds after the step move from the clock's compute to sync.
        "rank_sync_s": [0.5 + 0.25, 1.5],
        "rank_sync_share": [pytest.approx(0.75 / 3.5), pytest.approx(1.5 / 3.5)],
    }
    assert window.timings(100.0, traffic)[1:4] == [0, 0, 0.0]  # taken: the next window's own


def test_totals_make_the_summary_fields() -> None:
    totals = RunTotals()
    assert totals.tokens_per_s is None  # before the first row: nothing to show yet
    first = _window(0.0, [1.0], [1.0], costs=None)
    ranks = [[0.0, 8.0, 1.0, 0.5, 1.0, 1.0], [0.0, 8.0, 1.0, 0.0, 3.0, 0.0]]
    totals.add(first.close([0.0, 10.0, 20.0], ranks, now=2.0))
    second = _window(0.0, [2.0], [0.0], costs=None)
    ranks = [[0.0, 0.0, 0.0, 0.0, 2.0, 0.0], [0.0, 4.0, 1.0, 0.0, 2.0, 0.0]]
    totals.add(second.close([0.0, 30.0, 20.0], ranks, now=3.0))

    fields = totals.summary_fields(
        wall_time_s=9.0, final_train_loss=1.5, eval_loss=None, peak_rss_bytes=[1, 2]
    )
    assert fields == {
        "tokens": 40,
        "tokens_per_s": 8.0,  # 40 tokens over 2 + 3 seconds in windows
        "wall_time_s": 9.0,
        "final_train_loss": 1.5,
        "eval_loss": None,
        "peak_rss_bytes": [1, 2],
        "padding_fraction": 0.0,
        # The run's per-rank compute, step by step, through the same formula as a row's.
        "imbalance": pytest.approx(imbalance([[1.0, 2.0], [3.0, 2.0]])),
        "rank_wait_s": [1.0, 0.0],
        "wait_fraction": pytest.approx(1.0 / 9.0),  # 1 s waiting of 8 s compute + 1 s wait
        "sync_bytes_per_step": [4.0, 6.0],  # (8 + 0) and (8 + 4) bytes over 2 steps
        "sync_exchanges": [1, 2],
        "sync_time_s": [1.0 + 0.5, 0.0],  # the wait plus rank 0's exchange after a step
        "compute_time_s": [3.0 - 0.5, 5.0],
    }
    assert fields["imbalance"] == pytest.approx((3 + 2) / (2 + 2))


def test_a_run_with_no_rows_has_empty_totals() -> None:
    fields = RunTotals().summary_fields(0.0, None, None, [])
    assert fields["tokens_per_s"] == 0.0
    assert fields["imbalance"] == 1.0
    assert fields["rank_wait_s"] == []
    assert fields["wait_fraction"] is None
    assert fields["sync_bytes_per_step"] == fields["sync_time_s"] == []


def test_micro_steps_count_tokens_only_on_the_rank_that_owns_them() -> None:
    batch = collate([torch.arange(5).numpy(), torch.arange(3).numpy()], step_tokens=6)
    window = Window()
    window.record_micro_step(torch.tensor(1.0), batch)
    window.record_micro_step(torch.tensor(2.0), None)  # a peer counts this one
    assert window.counts().tolist() == [3.0, batch.n_tokens, batch.n_slots]
    assert (batch.n_tokens, batch.n_slots) == (6, 8)
