"""TokenBudgetSampler: exactly-once epochs, equal steps on every rank, balance, resume anywhere."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from shardwise.data.cost import batch_cost, cost_model_for, rnn_cost
from shardwise.data.sampler import SamplerPosition
from shardwise.data.token_sampler import StepPlan, TokenBudgetSampler
from shardwise.errors import ShardwiseError


def heavy_tailed(count: int, seed: int = 0) -> np.ndarray:
    """Log-normal lengths clipped to 8..1024: mostly short, a long tail up to the clip."""
    lengths = np.random.default_rng(seed).lognormal(np.log(64), 1.0, count)
    return np.clip(np.round(lengths), 8, 1024).astype(np.int64)


LENGTHS = heavy_tailed(1500)
SMALL = np.random.default_rng(1).integers(2, 60, size=97)
LAYOUTS = [(1, 1), (2, 1), (2, 3), (3, 2), (4, 1)]


def plans(sampler: TokenBudgetSampler, count: int) -> list[StepPlan]:
    return list(itertools.islice(sampler.steps(), count))


def first_epoch(sampler: TokenBudgetSampler) -> list[StepPlan]:
    """Steps until the position leaves epoch 0 (the last one may reach into epoch 1)."""
    steps = []
    for plan in sampler.steps():
        steps.append(plan)
        if plan.position[0] > 0:
            return steps
    raise AssertionError("unreachable")


def visited(steps: list[StepPlan]) -> Counter:
    return Counter(i for plan in steps for rank in plan.batches for batch in rank for i in batch)


@pytest.mark.parametrize(("world_size", "grad_accum"), LAYOUTS)
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("sort_window", [40, 5], ids=["windows", "steps-cross-windows"])
def test_an_epoch_visits_every_sample_exactly_once(
    world_size: int, grad_accum: int, packing: bool, sort_window: int
) -> None:
    sampler = TokenBudgetSampler(
        SMALL,
        64,
        world_size,
        grad_accum=grad_accum,
        seed=3,
        packing=packing,
        sort_window=sort_window,
    )
    steps = first_epoch(sampler)
    epoch, spill = steps[-1].position
    assert epoch == 1
    # Whatever the last step took from epoch 1 is the start of epoch 1's stream.
    expected = Counter(range(len(SMALL))) + Counter(sampler.stream(1)[:spill].tolist())
    assert visited(steps) == expected
    for plan in steps:
        assert len(plan.batches) == world_size
        assert all(len(rank) == grad_accum and all(rank) for rank in plan.batches)


@pytest.mark.parametrize(("world_size", "grad_accum"), LAYOUTS)
def test_every_rank_yields_the_same_number_of_micro_steps_with_the_same_step_facts(
    world_size: int, grad_accum: int
) -> None:
    count = 12 * grad_accum
    ranks = [
        list(itertools.islice(TokenBudgetSampler(SMALL, 64, world_size, r, grad_accum), count))
        for r in range(world_size)
    ]
    steps = plans(TokenBudgetSampler(SMALL, 64, world_size, grad_accum=grad_accum), 12)
    for micro in range(count):
        step = steps[micro // grad_accum]
        facts = {(req.step_tokens, req.position, req.rank_costs) for req in ranks_at(ranks, micro)}
        assert facts == {(step.step_tokens, step.position, step.rank_costs)}
        for rank, requests in enumerate(ranks):
            assert requests[micro].indices == step.batches[rank][micro % grad_accum]


def ranks_at(ranks: list[list], micro: int) -> list:
    return [requests[micro] for requests in ranks]


def test_step_tokens_counts_the_targets_of_every_batch_of_the_step() -> None:
    for plan in plans(TokenBudgetSampler(LENGTHS, 4096, world_size=2, grad_accum=2), 10):
        indices = [i for rank in plan.batches for batch in rank for i in batch]
        assert plan.step_tokens == int((LENGTHS[indices] - 1).sum())


def test_same_seed_and_epoch_give_the_same_plan_and_others_differ() -> None:
    def run(seed: int, epoch: int = 0) -> list[StepPlan]:
        return plans(
            TokenBudgetSampler(LENGTHS, 2048, 2, seed=seed, start=SamplerPosition(epoch)), 8
        )

    assert run(seed=5) == run(seed=5)
    assert run(seed=5) != run(seed=6)
    assert run(seed=5, epoch=0) != run(seed=5, epoch=1)


def test_padded_batches_stay_within_the_budget_and_an_oversized_one_gets_its_own() -> None:
    lengths = np.concatenate([SMALL, [500]])  # 499 inputs, over a budget of 128
    sampler = TokenBudgetSampler(lengths, 128, world_size=2, sort_window=1000)
    batches = [batch for plan in first_epoch(sampler) for rank in plan.batches for batch in rank]
    for batch in batches:
        inputs = lengths[list(batch)] - 1
        assert len(batch) == 1 or len(batch) * inputs.max() <= 128
    assert (len(lengths) - 1,) in batches


def test_the_stream_and_positions_do_not_depend_on_the_world_size() -> None:
    stream = TokenBudgetSampler(LENGTHS, 4096).stream(0)
    for world_size, grad_accum in LAYOUTS:
        sampler = TokenBudgetSampler(LENGTHS, 4096, world_size, grad_accum=grad_accum)
        assert (sampler.stream(0) == stream).all()
        steps = plans(sampler, 5)
        consumed = steps[-1].position[1]
        assert visited(steps) == Counter(stream[:consumed].tolist())


def test_resume_mid_epoch_on_two_ranks_then_one_neither_repeats_nor_skips() -> None:
    two = TokenBudgetSampler(LENGTHS, 4096, world_size=2, seed=7)
    before = plans(two, 6)
    position = SamplerPosition(*before[-1].position)
    assert position.epoch == 0 and 0 < position.offset < len(LENGTHS)
    one = TokenBudgetSampler(LENGTHS, 4096, world_size=1, seed=7, start=position)
    after = first_epoch(one)
    spill = after[-1].position[1]
    expected = Counter(range(len(LENGTHS))) + Counter(one.stream(1)[:spill].tolist())
    assert visited(before) + visited(after) == expected
    # Each rank's sampler, started at the position, sees the same plan as the whole run.
    again = TokenBudgetSampler(LENGTHS, 4096, world_size=2, rank=1, seed=7, start=position)
    uninterrupted = plans(TokenBudgetSampler(LENGTHS, 4096, world_size=2, seed=7), 9)[6:]
    assert plans(again, 3) == uninterrupted


@pytest.mark.parametrize(("world_size", "grad_accum"), [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_ranks_are_balanced_on_heavy_tailed_lengths(world_size: int, grad_accum: int) -> None:
    sampler = TokenBudgetSampler(LENGTHS, 8192, world_size, grad_accum=grad_accum)
    for plan in first_epoch(sampler):
        assert plan.predicted_imbalance <= 1.05
        costs = [sum(batch_cost(rnn_cost, LENGTHS[list(b)] - 1) for b in r) for r in plan.batches]
        assert costs == pytest.approx(plan.rank_costs)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_attention_cost_is_balanced_too(packing: bool) -> None:
    cost = cost_model_for("transformer")
    sampler = TokenBudgetSampler(LENGTHS, 8192, world_size=2, cost_model=cost, packing=packing)
    steps = first_epoch(sampler)
    assert max(plan.predicted_imbalance for plan in steps) <= 1.05


def test_padding_stays_small_when_windows_hold_the_whole_tail() -> None:
    steps = first_epoch(TokenBudgetSampler(LENGTHS, 4096, world_size=2))
    batches = [LENGTHS[list(b)] - 1 for plan in steps for rank in plan.batches for b in rank]
    slots = sum(len(inputs) * int(inputs.max()) for inputs in batches)
    assert 1 - (LENGTHS - 1).sum() / slots <= 0.05


def test_user_mistakes_are_named() -> None:
    with pytest.raises(ShardwiseError, match="fewer than the 8 batches"):
        TokenBudgetSampler(SMALL[:7], 64, world_size=4, grad_accum=2)
    with pytest.raises(ShardwiseError, match="at least 2 tokens"):
        TokenBudgetSampler(np.array([5, 1, 7]), 64)
    with pytest.raises(ShardwiseError, match="must be positive"):
        TokenBudgetSampler(SMALL, 0)
    with pytest.raises(ShardwiseError, match="resume position 500"):
        next(iter(TokenBudgetSampler(SMALL, 64, start=SamplerPosition(0, 500))))
