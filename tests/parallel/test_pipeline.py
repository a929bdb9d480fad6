"""A prepared model in one process: it trains exactly like plain training; its errors are clear."""

from __future__ import annotations

import pytest
import torch

from parallel_cases import (
    assert_ranks_match,
    parallelism,
    replica_share,
    step_batches,
    tiny_model,
    train_layout,
    train_single,
)
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.loss import token_loss_sum
from shardwise.parallel.mesh import Layout
from shardwise.parallel.parallelize import parallelize

ALONE = DistEnv(0, 1, 0, 1, torch.device("cpu"))
TWO_STAGES = Layout(dp=1, pp=2, tp=1, rank=0)  # checks run before any communication


@pytest.mark.parametrize("kind", ["gru", "transformer"])
def test_one_process_trains_exactly_like_plain_training(kind: str) -> None:
    assert_ranks_match([train_layout(ALONE, kind, {})], train_single(kind))


def test_evaluate_is_the_summed_token_loss() -> None:
    batch = step_batches()[2]
    model = parallelize(tiny_model("lstm"), parallelism(Layout()), ALONE)
    with torch.no_grad():
        want = token_loss_sum(tiny_model("lstm")(batch.tokens), batch.targets)
    assert float(model.evaluate(batch.tokens, batch.targets)) == pytest.approx(
        float(want), rel=1e-6
    )


def test_accumulating_without_sync_then_syncing_matches_one_step() -> None:
    batch = step_batches()[0]
    halves = [replica_share(batch, 2, half) for half in (0, 1)]
    whole = parallelize(tiny_model("gru"), parallelism(Layout()), ALONE)
    split = parallelize(tiny_model("gru"), parallelism(Layout()), ALONE)
    loss = whole.forward_backward(batch.tokens, batch.targets, batch.step_tokens)
    losses = [
        split.forward_backward(half.tokens, half.targets, batch.step_tokens, sync=sync)
        for half, sync in zip(halves, (False, True), strict=True)
    ]
    assert float(sum(losses)) == pytest.approx(float(loss), rel=1e-6)
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)


def test_the_prepared_model_keeps_the_model_s_own_names() -> None:
    model = parallelize(tiny_model("gru"), parallelism(Layout()), ALONE)
    assert list(model.state_dict()) == list(tiny_model("gru").state_dict())
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in tiny_model("gru").named_parameters()
    ]


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
    with pytest.raises(ShardwiseError, match=message):
        parallelize(tiny_model("gru"), parallelism(TWO_STAGES, **options), ALONE)


def test_packed_batches_are_refused_with_a_clear_message() -> None:
    batch = step_batches()[0]
    stages = parallelism(TWO_STAGES, cuts=["blocks.1"], schedule="gpipe", microbatches=2)
    model = parallelize(tiny_model("gru"), stages, ALONE)
    segments = torch.zeros_like(batch.tokens)
    with pytest.raises(ShardwiseError, match="packed batches"):
        model.forward_backward(batch.tokens, batch.targets, batch.step_tokens, segment_ids=segments)


def test_a_pipeline_stage_has_no_forward_of_its_own() -> None:
    stages = parallelism(TWO_STAGES, cuts=["blocks.1"], schedule="gpipe", microbatches=2)
    model = parallelize(tiny_model("gru"), stages, ALONE)
    with pytest.raises(ShardwiseError, match="forward_backward"):
        model(step_batches()[0].tokens)
