"""`shardwise train --pp/--tp/--dp`: the trainer's model-parallel layouts, end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import shardwise
from helpers import (
    assert_adam_equivalent_weights,
    assert_same_weights,
    final_weights,
    metrics,
    quick_config,
    train,
)

pytestmark = pytest.mark.timeout(150)


def test_pipeline_trains_like_one_process_and_resumes_in_another_layout(
    corpus: Path, tmp_path: Path
) -> None:
    # Same seed, same global batch (8 sequences): every layout sees the same data, same weights.
    common = {"batch_size": 8, "max_steps": 4, "checkpoint_every": 2, "clip_norm": 0.5}
    single = quick_config(corpus, tmp_path / "single", **common)
    pipeline = quick_config(
        corpus, tmp_path / "pp", pp=2, microbatches=4, schedule="gpipe", **common
    )
    alone = train(single, nproc=1)
    planned = shardwise.plan(pipeline.model_copy(update={"nproc": 2}))  # what --dry-run prints
    summary = train(pipeline, nproc=2)

    # The dry run's cut is the cut that trained, and summary.json records it.
    assert planned.stages is not None and planned.cuts
    assert summary["stages"] == [list(stage.layer_names) for stage in planned.stages.stages]
    assert [stage[0] for stage in summary["stages"][1:]] == planned.cuts

    assert_same_weights(final_weights(tmp_path / "single"), final_weights(tmp_path / "pp"), 1e-5)
    for one, two in zip(metrics(tmp_path / "single"), metrics(tmp_path / "pp"), strict=True):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
        assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-5)
    assert summary["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-5)
    assert summary["parameters"] == alone["parameters"]  # the whole model, not one stage

    # Saved with --pp 2, resumed with --dp 2 (plain data parallel, batch 4 per rank).
    step_2 = tmp_path / "dp" / "checkpoints" / "step_00000002"
    shutil.copytree(tmp_path / "pp" / "checkpoints" / "step_00000002", step_2)
    resumed = quick_config(
        corpus, tmp_path / "dp", batch_size=4, max_steps=4, resume=step_2, clip_norm=0.5
    )
    train(resumed, nproc=2)
    assert_same_weights(final_weights(tmp_path / "single"), final_weights(tmp_path / "dp"), 1e-5)


def test_tensor_parallel_transformer_trains_like_one_process(corpus: Path, tmp_path: Path) -> None:
    common = {"model": "transformer", "batch_size": 8, "max_steps": 3}
    train(quick_config(corpus, tmp_path / "single", **common), nproc=1)
    summary = train(quick_config(corpus, tmp_path / "tp", tp=2, **common), nproc=2)
    for one, two in zip(metrics(tmp_path / "single"), metrics(tmp_path / "tp"), strict=True):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    # Split layers sum partial products in another order: Adam amplifies that rounding.
    assert summary["world_size"] == 2
    assert_adam_equivalent_weights(
        final_weights(tmp_path / "single"), final_weights(tmp_path / "tp"), lr=3e-3
    )
