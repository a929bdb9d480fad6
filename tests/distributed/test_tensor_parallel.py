"""Transparency: layers split over tensor-parallel ranks train exactly like one process."""

from __future__ import annotations

from typing import Any

import pytest
from torch.distributed.tensor import DTensor

from parallel_cases import (
    Trained,
    assert_ranks_match,
    layout_for,
    tiny_model,
    train_layout,
    train_single,
)
from ranks import run_ranks
from shardwise.distributed import DistEnv
from shardwise.parallel.tensor_parallel import parallelize_lm


def two_rank_worker(env: DistEnv) -> dict[str, Any]:
    model = parallelize_lm(tiny_model("transformer"), layout_for(env, tp=2).submesh("tp"))
    return {
        "shards": {
            name: tuple(p.to_local().shape)
            for name, p in model.named_parameters()
            if isinstance(p, DTensor)
        },
        "tp2 transformer": train_layout(env, "transformer", {"tp": 2}),
        "tp2 lstm": train_layout(env, "lstm", {"tp": 2}),
    }


def four_rank_worker(env: DistEnv) -> dict[str, Trained]:
    return {
        "dp2xtp2 transformer": train_layout(env, "transformer", {"dp": 2, "tp": 2}),
        "pp2xtp2 transformer": train_layout(env, "transformer", {"pp": 2, "tp": 2}, microbatches=2),
    }


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    return run_ranks(two_rank_worker, world=2, timeout_s=60)


@pytest.fixture(scope="module")
def four_ranks() -> list[dict[str, Trained]]:
    return run_ranks(four_rank_worker, world=4, timeout_s=80)


@pytest.mark.timeout(90)
def test_each_rank_holds_half_of_every_split_layer(two_ranks: list[dict[str, Any]]) -> None:
    shards = two_ranks[0]["shards"]
    assert shards["head.1.weight"] == (128, 16)  # vocabulary rows, split column-wise
    assert shards["embed.weight"] == (128, 16)
    assert shards["blocks.0.attn.qkv.weight"] == (24, 16)  # one whole head of 3 x 8 columns
    assert shards["blocks.0.attn.proj.weight"] == (16, 8)
    assert shards["blocks.0.mlp.fc1.weight"] == (32, 16)
    assert shards["blocks.0.mlp.fc2.weight"] == (16, 32)
    assert "pos.weight" not in shards and "blocks.0.ln1.weight" not in shards


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_two_way_split_trains_exactly_like_one_process(
    two_ranks: list[dict[str, Any]], kind: str
) -> None:
    assert_ranks_match([result[f"tp2 {kind}"] for result in two_ranks], train_single(kind))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["dp2xtp2 transformer", "pp2xtp2 transformer"])
def test_split_layers_compose_with_replicas_and_stages(
    four_ranks: list[dict[str, Trained]], case: str
) -> None:
    assert_ranks_match([result[case] for result in four_ranks], train_single("transformer"))
