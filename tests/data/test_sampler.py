import itertools

import numpy as np
import pytest

from shardwise.data.sampler import FixedBatchSampler, SamplerPosition
from shardwise.errors import ShardwiseError

LENGTHS = np.random.default_rng(0).integers(2, 50, size=103)


def take(sampler: FixedBatchSampler, n: int) -> list:
    return list(itertools.islice(iter(sampler), n))


def test_ranks_split_exactly_the_global_batch_one_rank_would_take() -> None:
    single = take(FixedBatchSampler(LENGTHS, batch_size=8, seed=3), 5)
    ranks = [take(FixedBatchSampler(LENGTHS, 4, world_size=2, rank=r, seed=3), 5) for r in (0, 1)]
    for step, whole in enumerate(single):
        assert ranks[0][step].indices + ranks[1][step].indices == whole.indices
        assert ranks[0][step].step_tokens == ranks[1][step].step_tokens == whole.step_tokens


def test_step_tokens_counts_targets_of_the_whole_step_across_micro_steps() -> None:
    requests = take(FixedBatchSampler(LENGTHS, 4, world_size=2, rank=1, grad_accum=2), 2)
    assert requests[0].step_tokens == requests[1].step_tokens
    everything = [FixedBatchSampler(LENGTHS, 4, 2, r, grad_accum=2) for r in (0, 1)]
    indices = [i for sampler in everything for req in take(sampler, 2) for i in req.indices]
    assert requests[0].step_tokens == int((LENGTHS[indices] - 1).sum())


def test_an_epoch_never_repeats_a_sample_and_orders_differ_by_epoch() -> None:
    sampler = FixedBatchSampler(LENGTHS, 10, seed=1)
    per_epoch = len(LENGTHS) // 10
    first, second = take(sampler, per_epoch), take(sampler, 2 * per_epoch)[per_epoch:]
    seen = [i for req in first for i in req.indices]
    assert len(seen) == len(set(seen)) == per_epoch * 10
    assert [r.indices for r in first] != [r.indices for r in second]


def test_same_seed_same_order_other_seed_other_order() -> None:
    assert take(FixedBatchSampler(LENGTHS, 8, seed=5), 3) == take(
        FixedBatchSampler(LENGTHS, 8, seed=5), 3
    )
    assert take(FixedBatchSampler(LENGTHS, 8, seed=5), 3) != take(
        FixedBatchSampler(LENGTHS, 8, seed=6), 3
    )


def test_resume_on_another_world_size_continues_the_same_stream() -> None:
    two = [take(FixedBatchSampler(LENGTHS, 4, 2, r, seed=2), 3) for r in (0, 1)]
    position = SamplerPosition(*two[0][-1].position)
    assert position == SamplerPosition(0, 24)
    resumed = take(FixedBatchSampler(LENGTHS, 8, seed=2, start=position), 2)
    uninterrupted = take(FixedBatchSampler(LENGTHS, 8, seed=2), 5)[3:]
    assert resumed == uninterrupted
    consumed = {i for rank in two for req in rank for i in req.indices}
    assert consumed.isdisjoint(i for req in resumed for i in req.indices)


def test_too_little_data_for_one_global_batch() -> None:
    with pytest.raises(ShardwiseError, match="fewer than one global batch of 128"):
        FixedBatchSampler(LENGTHS, 32, world_size=2, grad_accum=2)
