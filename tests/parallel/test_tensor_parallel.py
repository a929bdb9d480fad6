"""Which layers tensor parallelism splits, and how; divisibility errors."""

from __future__ import annotations

import pytest
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from parallel_cases import tiny_model
from shardwise.errors import ShardwiseError
from shardwise.models import TransformerLM
from shardwise.parallel.stages import split_into_stages
from shardwise.parallel.tensor_parallel import find_layer_split, tensor_parallel_styles
from user_models import LayeredLM


def kinds(plan: dict) -> dict[str, str]:
    return {name: type(style).__name__ for name, style in plan.items()}


def test_transformer_plan_is_megatrons_pairing() -> None:
    plan = kinds(tensor_parallel_styles(tiny_model("transformer"), 2))
    assert (
        plan["head.1"] == plan["blocks.2.attn.qkv"] == plan["blocks.0.mlp.fc1"] == "ColwiseParallel"
    )
    assert (
        plan["blocks.2.attn.proj"] == plan["blocks.0.mlp.fc2"] == plan["embed"] == "RowwiseParallel"
    )
    assert "pos" not in plan and not any("ln" in name for name in plan)


def test_recurrent_model_splits_only_its_embedding_and_head() -> None:
    assert sorted(tensor_parallel_styles(tiny_model("lstm"), 2)) == ["embed", "head.1"]


def test_parts_choose_what_is_split() -> None:
    assert list(tensor_parallel_styles(tiny_model("transformer"), 2, parts=["head"])) == ["head.1"]
    with pytest.raises(ShardwiseError, match="unknown"):
        tensor_parallel_styles(tiny_model("transformer"), 2, parts=["lstm"])


def test_a_stage_is_planned_by_its_original_names() -> None:
    _, last = split_into_stages(tiny_model("transformer"), ["blocks.2"])
    assert sorted(tensor_parallel_styles(last, 2)) == [
        "blocks.2.attn.proj", "blocks.2.attn.qkv", "blocks.2.mlp.fc1", "blocks.2.mlp.fc2", "head.1"
    ]  # fmt: skip


def test_the_vocabulary_projection_gathers_whole_logits() -> None:
    head = tensor_parallel_styles(tiny_model("lstm"), 2)["head.1"]
    assert isinstance(head, ColwiseParallel) and not isinstance(head, RowwiseParallel)
    assert "Replicate" in repr(head.output_layouts)


@pytest.mark.parametrize(
    ("model", "tp", "message"),
    [
        (lambda: TransformerLM(dim=32, num_layers=1, num_heads=2), 4, "has 2 heads"),
        (lambda: TransformerLM(vocab_size=257, dim=32, num_layers=1), 2, "257 vocabulary"),
    ],
)
def test_layers_that_do_not_split_evenly_are_user_errors(model, tp: int, message: str) -> None:
    with pytest.raises(ShardwiseError, match=message):
        tensor_parallel_styles(model(), tp)


def test_a_model_that_declares_its_split_is_split_as_declared() -> None:
    model = LayeredLM(64)
    plan = find_layer_split(model, 2)  # by the declaration, not by probing what the layers do
    assert kinds(plan.styles) == {
        "tokens": "RowwiseParallel",
        "ff.0": "ColwiseParallel",
        "ff.2": "RowwiseParallel",
        "out": "ColwiseParallel",
    }
    assert plan.labels["out"] == "column-wise, output gathered"
    assert plan.token_bound == 64  # the token table's ids, not the smaller position table's
    assert list(tensor_parallel_styles(model, 2, parts=["mlp"])) == ["ff.0", "ff.2"]
    _, last = split_into_stages(model, ["mixer"])
    assert list(tensor_parallel_styles(last, 2)) == ["out"]  # a stage declares its share


def test_megatron_names_without_a_declaration_split_nothing() -> None:
    model = nn.Module()
    model.embed, model.head = nn.Embedding(8, 4), nn.Sequential(nn.Linear(4, 8))
    assert tensor_parallel_styles(model, 2) == {}  # find_layer_split probes such a model instead


class Declares(LayeredLM):
    def __init__(self, declared: dict) -> None:
        super().__init__(64)
        self.declared = declared

    def tp_styles(self) -> dict:
        return self.declared


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        (["ff.0"], r"returns \['ff.0'\]; return \{part: \{layer: style\}\}"),
        ({"moe": {"ff.0": "row-wise"}}, "names the part 'moe'; use head, embed, mlp, attn"),
        ({"mlp": {"ff.0": "diagonal"}}, "gives 'ff.0' the style 'diagonal'; use one of"),
        ({"attn": {"ff.0": ("column-wise", 0)}}, r"the style \('column-wise', 0\)"),
        ({"attn": {"ff.0": ("column-wise", 2, 3)}}, r"the style \('column-wise', 2, 3\)"),
        ({"mlp": {"ff.9": "row-wise"}}, "lists 'ff.9', which is not a submodule"),
        ({"mlp": {"mixer": "column-wise"}}, "splits 'mixer' \\(GRU\\) column-wise; tensor"),
        ({"embed": {"tokens": "column-wise"}}, "splits 'tokens' \\(Embedding\\) column-wise"),
    ],
)
def test_a_split_declared_wrong_is_a_user_error(declared: dict, message: str) -> None:
    with pytest.raises(ShardwiseError, match=message) as error:
        find_layer_split(Declares(declared), 2)
    assert str(error.value).startswith("Declares.tp_styles() ") and "\n" not in str(error.value)
