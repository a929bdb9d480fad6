"""PipelineRunner in one process: micro-batched training is exact; its errors are clear."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel_cases import (
    assert_ranks_match,
    replica_share,
    step_batches,
    tiny_model,
    train_layout,
    train_single,
)
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import ParallelMesh
from shardwise.parallel.pipeline import PipelineRunner, token_loss_sum

ALONE = DistEnv(0, 1, 0, 1, torch.device("cpu"))


@pytest.mark.parametrize("microbatches", [1, 3])
@pytest.mark.parametrize("kind", ["gru", "transformer"])
def test_one_stage_trains_exactly_like_plain_training(kind: str, microbatches: int) -> None:
    # 8 rows in 3 micro-batches: one padded row, and lengths padded up to a bucket of 8.
    trained = train_layout(ALONE, kind, {}, microbatches=microbatches, length_bucket=8)
    assert_ranks_match([trained], train_single(kind))


def test_eval_loss_is_the_summed_token_loss() -> None:
    batch = step_batches()[2]
    runner = PipelineRunner(tiny_model("lstm"), ParallelMesh(1, 1, 1), microbatches=3)
    with torch.no_grad():
        want = token_loss_sum(tiny_model("lstm")(batch.tokens), batch.targets)
    assert float(runner.eval_loss(batch)) == pytest.approx(float(want), rel=1e-6)
    assert runner.module.training  # eval_loss leaves the mode as it found it


def test_accumulating_without_sync_then_syncing_matches_one_step() -> None:
    batch = step_batches()[0]
    halves = [replica_share(batch, 2, half) for half in (0, 1)]
    whole = PipelineRunner(tiny_model("gru"), ParallelMesh(1, 1, 1), microbatches=2)
    split = PipelineRunner(tiny_model("gru"), ParallelMesh(1, 1, 1), microbatches=2)
    loss = whole.train_step(batch)
    losses = [split.train_step(halves[0], sync_grads=False), split.train_step(halves[1])]
    assert float(sum(losses)) == pytest.approx(float(loss), rel=1e-6)
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"schedule": "zigzag"}, "--schedule zigzag"),
        ({"schedule": "1f1b", "microbatches": 1}, "at least as many micro-batches as stages"),
        ({"microbatches": 0}, "--microbatches 0"),
        ({"cuts": []}, "0 split point.*1 stage.*--pp is 2"),
        ({"cuts": ["blocks.7"]}, "names no module"),
    ],
)
def test_layout_mistakes_are_user_errors(options: dict, message: str) -> None:
    options = {"cuts": ["blocks.1"], "schedule": "gpipe", "microbatches": 2} | options
    two_stages = ParallelMesh(dp=1, pp=2, tp=1, rank=0)  # checks run before any communication
    with pytest.raises(ShardwiseError, match=message):
        PipelineRunner(tiny_model("gru"), two_stages, **options)


def test_packed_batches_are_refused_with_a_clear_message() -> None:
    batch = step_batches()[0]
    if not hasattr(batch, "segment_ids"):
        pytest.skip("this Batch has no packed form")
    packed = dataclasses.replace(batch, segment_ids=torch.zeros_like(batch.tokens))
    runner = PipelineRunner(tiny_model("gru"), ParallelMesh(1, 1, 1))
    with pytest.raises(ShardwiseError, match="packed batches"):
        runner.train_step(packed)
