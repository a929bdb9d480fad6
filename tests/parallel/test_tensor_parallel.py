"""Which layers tensor parallelism splits, and how; divisibility errors."""

from __future__ import annotations

import pytest
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from parallel_cases import tiny_model
from shardwise.errors import ShardwiseError
from shardwise.models import TransformerLM
from shardwise.parallel.stages import split_into_stages
from shardwise.parallel.tensor_parallel import tensor_parallel_plan


def kinds(plan: dict) -> dict[str, str]:
    return {name: type(style).__name__ for name, style in plan.items()}


def test_transformer_plan_is_megatrons_pairing() -> None:
    plan = kinds(tensor_parallel_plan(tiny_model("transformer"), 2))
    assert (
        plan["head.1"] == plan["blocks.2.attn.qkv"] == plan["blocks.0.mlp.fc1"] == "ColwiseParallel"
    )
    assert (
        plan["blocks.2.attn.proj"] == plan["blocks.0.mlp.fc2"] == plan["embed"] == "RowwiseParallel"
    )
    assert "pos" not in plan and not any("ln" in name for name in plan)


def test_recurrent_model_splits_only_its_embedding_and_head() -> None:
    assert sorted(tensor_parallel_plan(tiny_model("lstm"), 2)) == ["embed", "head.1"]


def test_parts_choose_what_is_split() -> None:
    assert list(tensor_parallel_plan(tiny_model("transformer"), 2, parts=["head"])) == ["head.1"]
    with pytest.raises(ShardwiseError, match="unknown"):
        tensor_parallel_plan(tiny_model("transformer"), 2, parts=["lstm"])


def test_a_stage_is_planned_by_its_original_names() -> None:
    _, last = split_into_stages(tiny_model("transformer"), ["blocks.2"])
    assert sorted(tensor_parallel_plan(last, 2)) == [
        "blocks.2.attn.proj", "blocks.2.attn.qkv", "blocks.2.mlp.fc1", "blocks.2.mlp.fc2", "head.1"
    ]  # fmt: skip


def test_the_vocabulary_projection_gathers_whole_logits() -> None:
    head = tensor_parallel_plan(tiny_model("lstm"), 2)["head.1"]
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
        tensor_parallel_plan(model(), tp)
