"""Single-process behaviour of the training loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import assert_same_weights, final_weights, metrics, quick_config, train


def test_same_seed_same_weights_other_seed_other_weights(corpus: Path, tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        train(quick_config(corpus, tmp_path / name, seed=seed), nproc=1)
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"), 0)
    a, c = final_weights(tmp_path / "a"), final_weights(tmp_path / "c")
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_bf16_trains_and_stays_close_to_fp32(corpus: Path, tmp_path: Path) -> None:
    train(quick_config(corpus, tmp_path / "fp32", max_steps=4), nproc=1)
    train(quick_config(corpus, tmp_path / "bf16", max_steps=4, precision="bf16"), nproc=1)
    fp32 = [row["loss"] for row in metrics(tmp_path / "fp32")]
    bf16 = [row["loss"] for row in metrics(tmp_path / "bf16")]
    assert all(math.isfinite(loss) for loss in bf16)
    # bf16 really ran (other rounding), yet every step stays within 0.5% of fp32 (measured:
    # under 0.05% on the test corpus, while the loss itself falls by half over these steps).
    assert bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=5e-3)


def test_loss_falls_and_lr_follows_the_schedule(corpus: Path, tmp_path: Path) -> None:
    config = quick_config(corpus, tmp_path / "run", max_steps=12, warmup_steps=4, lr=1e-2)
    train(config, nproc=1)
    rows = metrics(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"]
    lrs = [row["lr"] for row in rows]
    assert lrs[3] == pytest.approx(1e-2)  # warmup ends at the peak
    assert lrs[-1] == pytest.approx(1e-3)  # cosine ends at min_lr_ratio * lr


def test_loader_worker_processes_give_the_same_training(corpus: Path, tmp_path: Path) -> None:
    train(quick_config(corpus, tmp_path / "inline", batching="tokens"), nproc=1)
    train(quick_config(corpus, tmp_path / "workers", batching="tokens", num_workers=2), nproc=1)
    assert_same_weights(final_weights(tmp_path / "inline"), final_weights(tmp_path / "workers"), 0)
