"""Exact resume, and checkpoints that load on another number of ranks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import assert_same_weights, final_weights, metrics, quick_config, train
from shardwise.errors import ShardwiseError

pytestmark = pytest.mark.timeout(180)


def copy_checkpoint(source_run: Path, step: int, target_run: Path) -> Path:
    name = f"step_{step:08d}"
    target = target_run / "checkpoints" / name
    shutil.copytree(source_run / "checkpoints" / name, target)
    return target


def test_resumed_run_ends_exactly_like_the_uninterrupted_one(corpus: Path, tmp_path: Path) -> None:
    full = quick_config(corpus, tmp_path / "full", max_steps=6, checkpoint_every=3)
    uninterrupted = train(full, nproc=2)
    checkpoint = copy_checkpoint(tmp_path / "full", 3, tmp_path / "resumed")
    resumed = quick_config(corpus, tmp_path / "resumed", max_steps=6, resume=checkpoint)
    summary = train(resumed, nproc=2)

    assert summary["steps"] == 6
    assert summary["tokens"] == uninterrupted["tokens"]  # the whole run's, not the last part's
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed"), 0)
    assert metrics(tmp_path / "resumed")[-1]["loss"] == metrics(tmp_path / "full")[-1]["loss"]
    # Resuming on one rank with the same global batch reads the same samples in the same order.
    single = quick_config(corpus, tmp_path / "single", max_steps=6, batch_size=8, resume=checkpoint)
    train(single, nproc=1)
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "single"), 1e-5)


def test_resume_from_a_run_directory_takes_its_latest_checkpoint(
    corpus: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train(quick_config(corpus, run, max_steps=4, checkpoint_every=2), nproc=1)
    summary = train(quick_config(corpus, None, max_steps=6, resume=run), nproc=1)
    assert summary["run_dir"] == str(run)
    assert summary["steps"] == 6
    assert [row["step"] for row in metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_token_batches_resume_mid_epoch_on_fewer_ranks(corpus: Path, tmp_path: Path) -> None:
    # 2 ranks, then 1 rank accumulating 2 micro-steps: the same batches make up every step,
    # so resuming on fewer ranks neither repeats nor skips a sample and ends identically.
    common = {"batching": "tokens", "tokens_per_batch": 256, "max_steps": 6}
    full = quick_config(corpus, tmp_path / "full", checkpoint_every=3, **common)
    train(full, nproc=2)
    checkpoint = copy_checkpoint(tmp_path / "full", 3, tmp_path / "one")
    resumed = quick_config(corpus, tmp_path / "one", grad_accum=2, resume=checkpoint, **common)
    train(resumed, nproc=1)
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "one"), 1e-5)


def test_resuming_with_another_data_order_is_refused(corpus: Path, tmp_path: Path) -> None:
    train(quick_config(corpus, tmp_path / "run", max_steps=2), nproc=1)
    changed = quick_config(corpus, tmp_path / "run", max_steps=4, seed=7, resume=tmp_path / "run")
    with pytest.raises(ShardwiseError, match="data order came from"):
        train(changed, nproc=1)
