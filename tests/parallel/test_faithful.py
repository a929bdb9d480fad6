"""A pipeline's chained pieces must compute what the model's own forward computes, or be refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import shardwise
from helpers import quick_config
from parallel_cases import tiny_model
from shardwise.errors import ShardwiseError
from shardwise.parallel.faithful import check_faithful_chain
from user_models import mask_in_blocks, mask_in_forward


def sequential_lm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 64))


@pytest.mark.parametrize("kind", ["lstm", "gru", "transformer"])
def test_the_built_in_pieces_are_faithful(kind: str) -> None:
    check_faithful_chain(tiny_model(kind), vocab_size=256)


def test_blocks_that_build_their_own_mask_and_sequentials_are_faithful() -> None:
    check_faithful_chain(mask_in_blocks(256), 256)
    check_faithful_chain(sequential_lm(), 64)


def test_a_forward_that_builds_the_mask_between_layers_is_refused_in_one_line() -> None:
    model = mask_in_forward(256).train()
    with pytest.raises(ShardwiseError) as refused:
        check_faithful_chain(model, 256)
    message = str(refused.value)
    assert message.startswith(
        "--pp: MaskInForward's layers chained as layer_names() lists them give other outputs "
        "than its forward (max difference "
    )
    assert message.endswith("make each listed layer do all its own work, or train without --pp")
    assert "\n" not in message
    assert model.training  # the probe's eval mode is undone


def test_the_given_forward_is_the_reference_and_log_probabilities_count_as_logits() -> None:
    model = sequential_lm()
    check_faithful_chain(model, 64, forward=lambda tokens: model(tokens).log_softmax(-1))
    with pytest.raises(ShardwiseError, match="max difference"):
        check_faithful_chain(model, 64, forward=lambda tokens: model(tokens.flip(1)))


def test_a_layer_that_fails_on_the_chain_is_named() -> None:
    class TakesTwo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.mix = nn.Embedding(8, 4), nn.Bilinear(4, 4, 8)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens)
            return self.mix(x, x)

        def layer_names(self) -> list[str]:
            return ["embed", "mix"]

    with pytest.raises(ShardwiseError, match=r"TakesTwo's layer 'mix' chained as .* fails on a"):
        check_faithful_chain(TakesTwo(), 8)


def test_the_preflight_refuses_an_unfaithful_pipeline_before_any_worker(
    corpus: Path, tmp_path: Path
) -> None:
    config = quick_config(
        corpus, tmp_path / "run", model="user_models:mask_in_forward", pp=2, nproc=2
    )
    with pytest.raises(ShardwiseError, match="MaskInForward's layers chained"):
        shardwise.plan(config)
