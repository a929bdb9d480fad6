"""Gradient norm and clipping in one process agree with torch's clip_grad_norm_."""

from __future__ import annotations

import pytest
import torch

from parallel_cases import step_batches, tiny_model
from shardwise.loss import token_loss_sum
from shardwise.parallel.data_parallel import average_over_group
from shardwise.parallel.gradients import clip_grad_norm, grad_norm
from shardwise.parallel.mesh import Layout

ALONE = Layout(dp=1, pp=1, tp=1)


def model_with_gradients() -> torch.nn.Module:
    model = tiny_model("gru")
    batch = step_batches()[0]
    token_loss_sum(model(batch.tokens), batch.targets).backward()
    return model


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e9])
def test_clip_grad_norm_matches_torch(max_norm: float) -> None:
    ours, theirs = model_with_gradients(), model_with_gradients()
    norm = clip_grad_norm(ours.parameters(), max_norm, ALONE)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm or float("inf"))
    assert float(norm) == pytest.approx(float(want), rel=1e-6)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-6, msg=name)


def test_grad_norm_skips_parameters_without_gradients() -> None:
    model = model_with_gradients()
    model.embed.weight.grad = None
    rest = [p for p in model.parameters() if p.grad is not None]
    assert float(grad_norm(model.parameters(), ALONE)) == pytest.approx(
        float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in rest]))), rel=1e-6
    )


def test_averaging_over_no_group_leaves_gradients_alone() -> None:
    model = model_with_gradients()
    before = [p.grad.clone() for p in model.parameters()]
    average_over_group(model.parameters(), None)
    for grad, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(grad, p.grad)
