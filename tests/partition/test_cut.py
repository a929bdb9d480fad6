"""Balanced contiguous cuts, plans built from costs, and the --dry-run table."""

from __future__ import annotations

import itertools

import pytest
import torch

from parallel_cases import tiny_model
from shardwise.errors import ShardwiseError
from shardwise.partition import PieceCost, balance, cut_stages
from shardwise.partition.cut import cut_from_costs


def brute_force(weights: list[float], parts: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(weights)), parts - 1):
        bounds = [0, *cuts, len(weights)]
        best = min(best, max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_balance_finds_the_smallest_largest_group(seed: int) -> None:
    rng = torch.Generator().manual_seed(seed)
    count = int(torch.randint(2, 9, (1,), generator=rng))
    parts = int(torch.randint(1, count + 1, (1,), generator=rng))
    weights = torch.rand(count, generator=rng).tolist()
    sizes = balance(count, parts, lambda _part, begin, end: sum(weights[begin:end]))
    assert len(sizes) == parts and sum(sizes) == count and min(sizes) >= 1
    bounds = [0, *itertools.accumulate(sizes)]
    worst = max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))
    assert worst == pytest.approx(brute_force(weights, parts))


def cost(name: str, time_s: float, megabytes: float, activations: float = 0.0) -> PieceCost:
    return PieceCost((name,), time_s, 0, int(megabytes * 2**20), int(activations * 2**20))


def test_time_only_and_memory_only_plans_follow_their_measure() -> None:
    # The first pieces are slow but small, the last one fast but large.
    costs = [cost("a", 3, 1), cost("b", 3, 1), cost("c", 1, 1), cost("d", 1, 8)]
    assert cut_from_costs(costs, 2, time_weight=1.0).cuts == ["b"]
    assert cut_from_costs(costs, 2, time_weight=0.0).cuts == ["d"]


def test_one_f_one_b_gives_early_stages_fewer_activations() -> None:
    # Four equal pieces that are all activations: stage 0 keeps min(M, K) = 2 micro-batches.
    costs = [cost(name, 1, 0, activations=1) for name in "abcd"]
    gpipe = cut_from_costs(costs, 2, microbatches=4, schedule="gpipe", time_weight=0.0)
    one_f_one_b = cut_from_costs(costs, 2, microbatches=4, schedule="1f1b", time_weight=0.0)
    assert gpipe.cuts == ["c"]  # 2 pieces x 4 micro-batches on each stage
    assert [s.memory_bytes // 2**20 for s in gpipe.stages] == [8, 8]
    assert one_f_one_b.cuts == ["b"]  # 1 piece x 2 in flight, then 3 pieces x 1
    assert [s.memory_bytes // 2**20 for s in one_f_one_b.stages] == [2, 3]


def test_plan_predicts_step_time_and_bubble() -> None:
    plan = cut_from_costs([cost("a", 0.01, 1), cost("b", 0.01, 1)], 2, microbatches=4)
    assert plan.bubble_bound == pytest.approx(1 / 5)
    assert plan.stages[0].time_s == pytest.approx(0.04)  # 4 micro-batches of 10 ms
    assert plan.step_time_s == pytest.approx(0.05)  # (M + K - 1) slots of the slowest


def test_plan_stages_cuts_a_real_model_and_describes_it() -> None:
    model = tiny_model("transformer")
    plan = cut_stages(model, 3, torch.randint(0, 256, (8, 16)), microbatches=4)
    assert len(plan.cuts) == 2
    assert [name for stage in plan.stages for name in stage.layer_names] == model.layer_names()
    assert sum(stage.param_count for stage in plan.stages) == sum(
        p.numel() for p in model.parameters()
    )
    text = plan.describe()
    assert "3 stages" in text and "bubble bound 33%" in text
    assert all(name in text for name in plan.cuts)


def test_given_split_points_are_kept_and_only_predicted() -> None:
    model = tiny_model("gru")
    plan = cut_stages(model, 2, torch.zeros(4, 8, dtype=torch.long), cuts=["head"], repeats=1)
    assert plan.cuts == ["head"]
    assert plan.stages[1].layer_names == ("head",)
    with pytest.raises(ShardwiseError, match="make 3 stage"):
        cut_stages(model, 2, torch.zeros(4, 8, dtype=torch.long), cuts=["blocks.1", "head"])


def test_more_stages_than_pieces_is_a_user_error() -> None:
    with pytest.raises(ShardwiseError, match=r"--pp 6: TransformerLM has 5 pieces"):
        cut_stages(tiny_model("transformer"), 6, torch.zeros(2, 4, dtype=torch.long))
