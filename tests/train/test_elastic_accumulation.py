"""On fewer nodes of --nnodes MIN:MAX each rank accumulates more: same steps, same data order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shardwise.config import TrainConfig
from shardwise.data.sampler import FixedBatchSampler
from shardwise.data.token_sampler import TokenBudgetSampler
from shardwise.errors import ShardwiseError
from shardwise.train.restarts import elastic_accumulation

LENGTHS = np.random.default_rng(5).integers(2, 200, size=600)
ELASTIC = {"nnodes": "1:2", "rdzv_endpoint": "10.0.0.1:29500"}


@pytest.mark.parametrize(
    ("values", "per_node", "world_size", "accumulation"),
    [
        ({}, 2, 4, 1),  # every node there: --grad-accum as given
        ({}, 2, 2, 2),  # one of two nodes: twice the micro-steps
        ({"grad_accum": 3}, 2, 2, 6),
        ({"pp": 2}, 2, 2, 2),  # 2 replicas of 2 stages, then 1
        ({"nnodes": "2:4", "grad_accum": 3}, 1, 3, 4),
    ],
)
def test_the_full_worlds_global_batch_is_kept_on_fewer_nodes(
    monkeypatch, values: dict, per_node: int, world_size: int, accumulation: int
) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
    config = TrainConfig(**{**ELASTIC, **values})
    adjusted = elastic_accumulation(config, world_size)
    assert adjusted.grad_accum == accumulation
    full = config.layout(config.nnodes * per_node).dp * config.grad_accum
    assert adjusted.layout(world_size).dp * adjusted.grad_accum == full


def test_a_fixed_node_count_keeps_its_accumulation_and_uneven_nodes_are_refused(
    monkeypatch,
) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    fixed = TrainConfig(nnodes=2, rdzv_endpoint="10.0.0.1:29500")
    assert elastic_accumulation(fixed, 2) is fixed
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # this node has 4, the other node 1: 8 vs 5
    with pytest.raises(ShardwiseError, match="5 ranks make 5 replicas, which cannot split"):
        elastic_accumulation(TrainConfig(**ELASTIC), 5)


@pytest.mark.parametrize("batching", ["tokens", "fixed"])
def test_two_ranks_and_one_rank_accumulating_two_take_the_same_global_steps(
    batching: str,
) -> None:
    # A step is cut into replicas x accumulation batches: 2 x 1 and 1 x 2 cut it the same.
    def steps(world_size: int, grad_accum: int) -> list[list[tuple[int, ...]]]:
        micro = [_requests(batching, world_size, rank, grad_accum) for rank in range(world_size)]
        return [
            sorted(tuple(request.indices) for rank in micro for request in rank[s : s + grad_accum])
            for s in range(0, 10 * grad_accum, grad_accum)
        ]

    two, one = steps(2, 1), steps(1, 2)
    assert two == one
    assert steps(1, 1)[:5] != one[:5]  # a step of half the batch is another sequence of steps


def _requests(batching: str, world_size: int, rank: int, grad_accum: int) -> list:
    if batching == "fixed":
        sampler = FixedBatchSampler(LENGTHS, 8, world_size, rank, grad_accum, seed=3)
    else:
        sampler = TokenBudgetSampler(LENGTHS, 1024, world_size, rank, grad_accum, seed=3)
    return list(itertools.islice(iter(sampler), 10 * grad_accum))
