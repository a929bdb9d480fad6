"""Cost models: what a batch is predicted to cost, padded or packed, RNN or attention."""

from __future__ import annotations

import numpy as np
import pytest

from shardwise.data.cost import (
    DEFAULT_QUADRATIC_WEIGHT,
    attention_cost,
    batch_cost,
    cost_model_for,
    rnn_cost,
)
from shardwise.data.token_sampler import TokenBudgetSampler


def test_rnn_cost_is_the_tokens_stepped_through() -> None:
    assert rnn_cost(np.array([3, 5])) == 8.0


def test_attention_adds_a_quadratic_term_per_span() -> None:
    assert attention_cost(np.array([100, 100]), quadratic_weight=0.01) == 200 + 0.01 * 20_000
    # Two packed sequences of 100 cost less than one row of 200: attention never crosses them.
    assert attention_cost(np.array([100, 100])) < attention_cost(np.array([200]))


def test_cost_model_for_picks_attention_only_for_the_transformer() -> None:
    assert cost_model_for("lstm") is rnn_cost
    assert cost_model_for("gru") is rnn_cost
    expected = 1024 + DEFAULT_QUADRATIC_WEIGHT * 1024**2
    assert cost_model_for("transformer")(np.array([1024])) == pytest.approx(expected)
    assert cost_model_for("my_pkg.lm:build") is rnn_cost  # a factory's shape is unknown


def test_a_padded_batch_costs_its_width_on_every_row() -> None:
    assert batch_cost(rnn_cost, np.array([10, 4])) == 20.0
    assert batch_cost(rnn_cost, np.array([10, 4]), packed=True) == 14.0


def test_a_users_cost_model_plugs_into_the_sampler() -> None:
    seen: list[np.ndarray] = []

    def per_step_overhead(lengths: np.ndarray) -> float:
        seen.append(lengths)
        return float(lengths.sum() + 8 * lengths.max())

    lengths = np.random.default_rng(0).integers(2, 100, size=200)
    plan = next(TokenBudgetSampler(lengths, 512, 2, cost_model=per_step_overhead).steps())
    assert seen and all(isinstance(spans, np.ndarray) for spans in seen)
    for rank, cost in zip(plan.batches, plan.rank_costs, strict=True):
        (batch,) = rank
        assert cost == batch_cost(per_step_overhead, lengths[list(batch)] - 1)
