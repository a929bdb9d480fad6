"""The text summary says each thing once, and nothing that is not so."""

from __future__ import annotations

from shardwise.report.summary import format_summary


def test_under_ddp_the_wait_share_is_said_once() -> None:
    summary = {
        "world_size": 2,
        "sync": "allreduce",
        "wait_fraction": 0.216,
        "sync_bytes_per_step": [4096.0, 4096.0],
        "sync_time_s": [2.16, 2.16],
        "compute_time_s": [7.84, 7.84],
    }
    text = format_summary(summary)
    assert "21.6% of step time waiting for peers" in text
    assert text.count("21.6%") == 1, text


def test_one_replica_exchanges_no_gradients_and_says_so() -> None:
    summary = {"world_size": 2, "sync": "allreduce", "sync_bytes_per_step": [0.0, 0.0]}
    text = format_summary(summary)
    assert "0 B/step" not in text and "none: one replica" in text


def test_evaluation_seconds_are_the_total_and_tokens_one_evaluation() -> None:
    summary = {"eval_loss": 2.0, "eval_tokens": 1000, "eval_tokens_available": 1000, "eval_s": 0.9}
    assert "1,000 each; 0.9s evaluating in all" in format_summary(summary)
