"""Cutting a step into equal-cost batches and dealing them to ranks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shardwise.data.balance import (
    batches_needed,
    deal_to_ranks,
    fill_padded,
    split_packed,
    split_padded,
)
from shardwise.data.cost import attention_cost, batch_cost, rnn_cost


def longest_first(values: list[int]) -> np.ndarray:
    return np.array(sorted(values, reverse=True))


def test_batches_needed_counts_full_batches_and_lone_oversized_rows() -> None:
    assert batches_needed(np.array([9, 5, 5, 2]), budget=10, limit=8) == 3
    assert batches_needed(np.array([30, 20, 1]), budget=10, limit=8) == 3


def test_split_padded_finds_the_least_maximal_cost_of_any_contiguous_cut() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        widths = longest_first(rng.integers(1, 30, size=int(rng.integers(3, 9))).tolist())
        parts, budget = 3, 60
        if batches_needed(widths, budget, parts) > parts:
            continue
        runs = split_padded(widths, parts, budget, rnn_cost)
        assert len(runs) == parts and runs[0].start == 0 and runs[-1].stop == len(widths)
        assert all(
            len(widths[run]) * widths[run][0] <= budget or len(widths[run]) == 1 for run in runs
        )
        best = min(
            max(
                batch_cost(rnn_cost, widths[a:b])
                for a, b in itertools.pairwise((0, *cut, len(widths)))
            )
            for cut in itertools.combinations(range(1, len(widths)), parts - 1)
            if all(
                (b - a) * widths[a] <= budget or b - a == 1
                for a, b in itertools.pairwise((0, *cut, len(widths)))
            )
        )
        assert max(batch_cost(rnn_cost, widths[run]) for run in runs) == pytest.approx(best)


def test_split_padded_refuses_rows_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        split_padded(np.array([10, 10, 10]), 2, budget=10, cost_model=rnn_cost)


def test_fill_takes_everything_that_fits() -> None:
    assert fill_padded(np.array([5, 4, 3]), 2, budget=100, cost_model=rnn_cost) == 3


def test_fill_shrinks_the_costliest_batch_when_full_batches_cost_unequally() -> None:
    # Under attention a full batch of 1000-token rows costs more than one of 250-token rows.
    widths = longest_first([1000] * 4 + [250] * 40)

    def cost(spans: np.ndarray) -> float:
        return attention_cost(spans, quadratic_weight=1 / 500)

    full = split_padded(widths[:20], 2, 4000, cost)
    costs = [batch_cost(cost, widths[run]) for run in full]
    assert costs == [12_000, 6_000]  # both batches at the budget, 2x apart in cost
    stop = fill_padded(widths, 2, budget=4000, cost_model=cost)
    assert stop == 4  # two rows of 1000 each: 6,000 apiece, the rest starts the next step
    costs = [batch_cost(cost, widths[run]) for run in split_padded(widths[:stop], 2, 4000, cost)]
    assert costs == [6_000, 6_000]


def test_split_packed_balances_costs_and_leaves_no_batch_empty() -> None:
    assert split_packed(np.array([9, 5, 4, 1]), 2, rnn_cost) == [[0, 3], [1, 2]]
    groups = split_packed(np.array([100, 1, 1]), 3, rnn_cost)
    assert sorted(map(len, groups)) == [1, 1, 1]


def test_deal_to_ranks_gives_each_rank_its_share_costliest_first() -> None:
    assert deal_to_ranks([5.0, 4.0, 3.0, 2.0], world_size=2, per_rank=2) == [[0, 3], [1, 2]]
    owned = deal_to_ranks([1.0] * 6, world_size=3, per_rank=2)
    assert sorted(b for rank in owned for b in rank) == list(range(6))
    assert [len(rank) for rank in owned] == [2, 2, 2]
    with pytest.raises(ValueError, match="cannot give"):
        deal_to_ranks([1.0] * 5, world_size=2, per_rank=2)
