"""Transparency: data-parallel training computes what single-process training computes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers import (
    assert_same_weights,
    final_weights,
    metrics,
    quick_config,
    train,
    write_corpus,
)
from shardwise.data.tokenize import VOCAB_SIZE
from shardwise.models import build_model
from shardwise.train.export import sample_text

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def one_rank_batch_8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rank, batch 8, clipping every step: the run both layouts below must match (once)."""
    root = tmp_path_factory.mktemp("data_parallel")
    corpus = write_corpus(root / "corpus.txt")  # seeded: the same text as the `corpus` fixture's
    # clip_norm small enough that every step clips: the clipped update must match too.
    train(quick_config(corpus, root / "one", batch_size=8, clip_norm=0.5), nproc=1)
    return root / "one"


@pytest.mark.parametrize(("batch_size", "grad_accum"), [(4, 1), (2, 2)], ids=["plain", "accum"])
def test_two_ranks_match_one_rank_with_twice_the_batch(
    corpus: Path, tmp_path: Path, batch_size: int, grad_accum: int, one_rank_batch_8: Path
) -> None:
    double = quick_config(
        corpus, tmp_path / "two", batch_size=batch_size, grad_accum=grad_accum, clip_norm=0.5
    )
    summary = train(double, nproc=2)

    one = one_rank_batch_8
    assert_same_weights(final_weights(one), final_weights(tmp_path / "two"), 1e-5)
    one_rows, two_rows = metrics(one), metrics(tmp_path / "two")
    for one, two in zip(one_rows, two_rows, strict=True):
        assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-5)
        assert one["grad_norm"] > 0.5  # clipping really happened
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert summary["world_size"] == 2
    assert len(two_rows[-1]["rank_step_time_s"]) == 2


def test_token_batches_on_two_ranks_match_one_rank_accumulating_both(
    corpus: Path, tmp_path: Path
) -> None:
    # One step = the same stretch of the length-sorted stream, cut into the same two batches:
    # on 2 ranks each takes one, on 1 rank they are two accumulation micro-steps.
    common = {"batching": "tokens", "tokens_per_batch": 256, "clip_norm": 0.5}
    train(quick_config(corpus, tmp_path / "one", grad_accum=2, **common), nproc=1)
    summary = train(quick_config(corpus, tmp_path / "two", **common), nproc=2)

    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), 1e-5)
    two_rows = metrics(tmp_path / "two")
    for one, two in zip(metrics(tmp_path / "one"), two_rows, strict=True):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert summary["padding_fraction"] < 0.15
    assert len(summary["rank_wait_s"]) == 2
    _assert_imbalance_is_slowest_over_mean_compute(summary, two_rows)


def _assert_imbalance_is_slowest_over_mean_compute(summary: dict, rows: list[dict]) -> None:
    """Recompute every imbalance from the rows' per-rank times (log_every=1: a row is a step)."""
    # A one-step row's rank_step_time_s is compute + wait, and rank_wait_s the wait.
    compute = [
        [
            total - wait
            for total, wait in zip(row["rank_step_time_s"], row["rank_wait_s"], strict=True)
        ]
        for row in rows
    ]
    for row, step in zip(rows, compute, strict=True):
        assert row["imbalance"] == pytest.approx(max(step) / (sum(step) / len(step)), rel=1e-9)
    slowest = sum(max(step) for step in compute)
    mean = sum(sum(step) / len(step) for step in compute)
    assert summary["imbalance"] == pytest.approx(slowest / mean, rel=1e-9)
    waits = [sum(row["rank_wait_s"][rank] for row in rows) for rank in range(2)]
    assert summary["rank_wait_s"] == pytest.approx(waits, rel=1e-9)


def test_summary_and_run_directory_hold_what_the_user_is_promised(
    corpus: Path, tmp_path: Path
) -> None:
    config = quick_config(corpus, tmp_path / "run", max_len=32, tensorboard=True, sample_bytes=20)
    summary = train(config, nproc=2)
    run = tmp_path / "run"
    rows = metrics(run)
    assert (summary["world_size"], summary["steps"]) == (2, 3)
    assert summary["final_train_loss"] == rows[-1]["loss"]  # log_every=1: the last step's loss
    # Three steps already beat guessing bytes uniformly (ln 256), on held-out text too.
    assert 0 < summary["eval_loss"] < math.log(VOCAB_SIZE)
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    assert len(summary["peak_rss_bytes"]) == 2
    assert all(rss > 50 * 2**20 for rss in summary["peak_rss_bytes"])
    assert 0 < summary["padding_fraction"] < 1
    assert "split into chunks" in summary["data_notes"]  # 40-word paragraphs exceed 32 tokens
    # The sample is what the exported weights write after the prompt, with the run's seed.
    model = build_model(config.model, VOCAB_SIZE)
    model.load_state_dict(final_weights(run))
    assert summary["sample_text"] == sample_text(model, config.sample_bytes, config.seed)
    for name in ("config.toml", "metrics.jsonl", "summary.json", "report.md", "loss.png"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert (run / "checkpoints" / "step_00000003" / "trainer_state.json").is_file()
