"""Cutting models into stages: same forward, same parameter names, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parallel_cases import tiny_model
from shardwise.errors import ShardwiseError
from shardwise.models import RecurrentLM
from shardwise.parallel.faithful import check_faithful_chain
from shardwise.parallel.stages import model_pieces, split_into_stages
from user_models import LayeredLM

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


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (
            "lstm",
            [
                (("embed",), ("drop",)),
                (("blocks.0",), ("drop",)),
                (("blocks.1",), ("drop",)),
                (("blocks.2",), ("drop",)),
                (("head",), ()),
            ],
        ),
        (
            "transformer",
            [
                (("embed", "pos"), ("drop",)),
                (("blocks.0",), ()),
                (("blocks.1",), ()),
                (("blocks.2",), ()),
                (("head",), ()),
            ],
        ),
    ],
)
def test_built_in_pieces_hold_the_same_modules_and_helpers(kind: str, expected: list) -> None:
    # What recompute and sharding find blocks through: the same list as when shardwise cut the
    # built-ins by their type.
    assert [(p.names, p.helpers) for p in model_pieces(tiny_model(kind))] == expected


def test_a_model_says_how_its_layers_run_and_which_modules_they_share() -> None:
    torch.manual_seed(0)
    model = LayeredLM(64, dropout=0.5)
    pieces = model_pieces(model)
    assert [(p.names, p.helpers) for p in pieces] == [
        (("tokens", "places"), ("dropout",)),
        (("ff",), ()),
        (("mixer",), ("dropout",)),
        (("out",), ()),
    ]
    stages = [stage.eval() for stage in split_into_stages(model, ["mixer"])]
    tokens = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(chain(stages, tokens), model.eval()(tokens), atol=0, rtol=0)
    check_faithful_chain(model, 64)
    first = stages[0].train()
    assert not torch.equal(first(tokens), first(tokens))  # the dropout it uses went with it
    with pytest.raises(ShardwiseError, match="'places' is inside a piece"):
        split_into_stages(model, ["places"])


class UsesTheHead(LayeredLM):
    def layer_uses(self, name: str) -> tuple[str, ...]:
        return {"tokens": ("places", "out"), "ff": ("out",)}.get(name, ())


class UsesAStatefulModule(LayeredLM):
    def layer_names(self) -> list[str]:
        return ["tokens", "ff", "mixer", "out"]  # no "places", which `tokens` uses


class UsesNothingThere(LayeredLM):
    def layer_uses(self, name: str) -> tuple[str, ...]:
        return ("nowhere",) if name == "ff" else ()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (UsesTheHead, "joins layer 'out' to both 'tokens' and 'ff'; a layer belongs to one piece"),
        (UsesAStatefulModule, "names 'places', which holds parameters or buffers but is not in "),
        (UsesNothingThere, r"UsesNothingThere.layer_uses\('ff'\) lists 'nowhere', which is not a"),
    ],
)
def test_layer_uses_that_cannot_make_pieces_are_user_errors(model: type, message: str) -> None:
    with pytest.raises(ShardwiseError, match=message) as error:
        model_pieces(model())
    assert "\n" not in str(error.value)
