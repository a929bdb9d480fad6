"""Cutting models into stages: same forward, same parameter names, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parallel_cases import tiny_model
from shardwise.errors import ShardwiseError
from shardwise.models import RecurrentLM
from shardwise.parallel.stages import model_pieces, split_into_stages

KINDS = ["lstm", "gru", "transformer"]


def chain(stages: list[nn.Module], tokens: torch.Tensor) -> torch.Tensor:
    x = tokens
    for stage in stages:
        x = stage(x)
    return x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cuts", [[], ["blocks.1"], ["blocks.0", "blocks.2", "head"]])
def test_stages_keep_the_models_parameter_names_and_forward(kind: str, cuts: list[str]) -> None:
    model = tiny_model(kind).eval()
    stages = split_into_stages(model, cuts)
    names = [name for stage in stages for name, _ in stage.named_parameters()]
    keys = [key for stage in stages for key in stage.state_dict()]
    assert names == [name for name, _ in model.named_parameters()]
    assert keys == list(model.state_dict())
    tokens = torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(chain(stages, tokens), model(tokens), atol=0, rtol=0)


def test_stages_share_the_models_modules_without_copying() -> None:
    model = tiny_model("lstm")
    _, second = split_into_stages(model, ["blocks.1"])
    assert second.get_submodule("blocks.1") is model.blocks[1]
    assert second.layer_names == ["blocks.1", "blocks.2", "head"]


def test_lstm_stage_drops_the_state_and_returns_the_outputs() -> None:
    first, _ = split_into_stages(tiny_model("lstm"), ["blocks.1"])
    out = first(torch.randint(0, 256, (2, 5)))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 16)


def test_train_and_eval_reach_the_dropout_a_stage_calls() -> None:
    torch.manual_seed(0)
    model = RecurrentLM(embed_dim=8, hidden_dim=8, num_layers=2, dropout=0.5)
    stage = split_into_stages(model, ["blocks.1"])[0]
    tokens = torch.randint(0, 256, (2, 5))
    assert not torch.equal(stage(tokens), stage(tokens))  # training: dropout on
    stage.eval()
    torch.testing.assert_close(stage(tokens), stage(tokens), atol=0, rtol=0)


def test_transformer_embedding_and_positions_are_one_piece() -> None:
    pieces = model_pieces(tiny_model("transformer"))
    assert [p.names for p in pieces] == [
        ("embed", "pos"),
        ("blocks.0",),
        ("blocks.1",),
        ("blocks.2",),
        ("head",),
    ]


def test_sequential_and_layer_names_models_are_cut_by_their_children() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.GRU(4, 4, batch_first=True), nn.Linear(4, 10))
    first, second = split_into_stages(model, ["1"])
    tokens = torch.randint(0, 10, (2, 3))
    torch.testing.assert_close(second(first(tokens)), model[2](model[1](model[0](tokens))[0]))
    assert list(dict(second.named_parameters())) == [
        "1.weight_ih_l0",
        "1.weight_hh_l0",
        "1.bias_ih_l0",
        "1.bias_hh_l0",
        "2.weight",
        "2.bias",
    ]


@pytest.mark.parametrize(
    ("cuts", "message"),
    [
        (["blocks.9"], "'blocks.9' names no module"),
        (["pos"], "'pos' is inside a piece"),
        (["blocks.1.ln1"], "is inside a piece"),
        (["embed"], "'embed' starts the first stage already"),
        (["blocks.2", "blocks.1"], "in forward order"),
        (["blocks.1", "blocks.1"], "once"),
    ],
)
def test_bad_split_points_are_user_errors_naming_the_valid_ones(
    cuts: list[str], message: str
) -> None:
    with pytest.raises(ShardwiseError, match=message) as error:
        split_into_stages(tiny_model("transformer"), cuts)
    assert "\n" not in str(error.value)


def test_a_model_without_pieces_is_a_user_error() -> None:
    with pytest.raises(ShardwiseError, match="layer_names"):
        model_pieces(nn.Linear(2, 2))
