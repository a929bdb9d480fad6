"""The held-out subset (bounded, seeded, alike on every rank), its batches, and when it runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import quick_config
from shardwise.distributed import DistEnv
from shardwise.parallel.mesh import Layout
from shardwise.parallel.sync import AllReduceEveryStep, AsyncUpdates
from shardwise.train.accounting import Window
from shardwise.train.evaluation import (
    Evaluations,
    HeldOutSet,
    choose_subset,
    held_out_loss,
    length_batches,
)

ALONE = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def _sequences(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(n)) for n in rng.integers(1, 300, size=count)]


@pytest.mark.parametrize("budget", [1, 50, 299, 1_000, 20_000])
def test_subset_stays_within_its_budget_and_fills_it(budget: int) -> None:
    targets = np.random.default_rng(1).integers(0, 300, size=400)
    chosen = choose_subset(targets, budget, seed=3)
    assert len(set(chosen.tolist())) == len(chosen)
    assert targets[chosen].sum() <= budget
    assert (targets[chosen] > 0).all()
    # Nothing left out would still have fitted: the budget is used as far as it goes.
    left = budget - targets[chosen].sum()
    rest = np.setdiff1d(np.flatnonzero(targets > 0), chosen)
    assert (targets[rest] > left).all()


def test_subset_is_seeded_and_zero_means_every_sequence_with_targets() -> None:
    targets = np.random.default_rng(2).integers(0, 300, size=400)
    first = choose_subset(targets, 5_000, seed=7)
    assert np.array_equal(first, choose_subset(targets.copy(), 5_000, seed=7))
    assert not np.array_equal(first, choose_subset(targets, 5_000, seed=8))
    assert np.array_equal(choose_subset(targets, 0, seed=7), np.flatnonzero(targets > 0))
    assert np.array_equal(choose_subset(targets, 10**9, seed=7), np.flatnonzero(targets > 0))


def test_batches_hold_every_chosen_sequence_once_sorted_within_the_token_budget() -> None:
    targets = np.random.default_rng(4).integers(1, 300, size=200)
    batches = length_batches(targets, batch_tokens=1_024)
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(200))
    assert (np.diff(targets[order]) >= 0).all()  # short with short: little padding
    for batch in batches:
        assert len(batch) * targets[batch].max() <= 1_024 or len(batch) == 1
    small = length_batches(np.array([5, 2, 4]), batch_tokens=8)
    assert [batch.tolist() for batch in small] == [[1, 2], [0]]


def test_held_out_set_counts_targets_and_is_built_alike_on_every_rank(tmp_path) -> None:
    sequences = _sequences(300)
    config = quick_config(tmp_path / "c.txt", tmp_path, eval_tokens=4_000, seed=5)
    one, other = HeldOutSet.for_config(config, sequences), HeldOutSet.for_config(config, sequences)
    assert one.tokens == sum(len(s) - 1 for batch in one.batches for s in batch) <= 4_000
    assert one.available == sum(len(s) - 1 for s in sequences)
    assert [[s.tolist() for s in b] for b in one.batches] == [
        [s.tolist() for s in b] for b in other.batches
    ]
    everything = HeldOutSet.for_config(config.model_copy(update={"eval_tokens": 0}), sequences)
    assert everything.tokens == everything.available


class _CountingModel:
    """Enough of a ParallelModel for held_out_loss: a loss of 1 a target; records its batches."""

    owns_loss = True

    def __init__(self, dp: int, dp_rank: int, remote: bool = False, meet: bool = False) -> None:
        self.layout = Layout(dp=dp, rank=dp_rank)  # one rank per replica: rank is dp_rank
        self.forwards_meet = meet  # as a sharded model's do
        self.strategy = AsyncUpdates() if remote else AllReduceEveryStep()
        self.seen: list[int] = []
        self.modes: list[str] = []

    def eval(self) -> None:
        self.modes.append("eval")

    def train(self) -> None:
        self.modes.append("train")

    def evaluate(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.seen.append(int((targets >= 0).sum()))
        return torch.tensor(float((targets >= 0).sum()))


def test_replicas_share_the_batches_out_once_and_progress_reaches_the_total() -> None:
    held_out = HeldOutSet.choose(_sequences(120), budget=6_000, seed=0, batch_tokens=700)
    assert len(held_out.batches) > 4
    models = [_CountingModel(dp=2, dp_rank=rank) for rank in range(2)]
    shown: list[int] = []
    for model in models:
        assert held_out_loss(model, held_out, ALONE, shown.append if model is models[0] else None)
        assert model.modes == ["eval", "train"]
    assert sorted(models[0].seen + models[1].seen) == sorted(held_out.batch_tokens())
    assert models[0].seen == held_out.batch_tokens()[0::2]
    assert shown == sorted(shown) and shown[-1] == held_out.tokens


def test_an_asynchronous_run_evaluates_everything_on_rank_0() -> None:
    held_out = HeldOutSet.choose(_sequences(50), budget=0, seed=0, batch_tokens=700)
    model = _CountingModel(dp=2, dp_rank=0, remote=True)
    assert held_out_loss(model, held_out, ALONE) == pytest.approx(1.0)
    assert model.seen == held_out.batch_tokens()


def test_evaluations_run_every_n_steps_and_at_the_end_each_once(tmp_path) -> None:
    config = quick_config(tmp_path / "c.txt", tmp_path, eval_every=4, max_steps=10)
    model = _CountingModel(dp=1, dp_rank=0)
    evaluations = Evaluations(config, _sequences(40), model, ALONE)  # type: ignore[arg-type]
    due = [step for step in range(1, 11) if evaluations.due(step)]
    assert due == [4, 8, 10]
    window = Window(started=100.0)
    assert evaluations.if_due(3, window) == {}
    assert window.started == 100.0
    assert evaluations.if_due(10, window) == {"eval_loss": pytest.approx(1.0)}
    assert window.started > 100.0  # the evaluation's time left out of the training window
    batches = len(model.seen)
    assert evaluations.loss_at(10) == pytest.approx(1.0)  # the end of the run: not again
    assert len(model.seen) == batches
    never = Evaluations(config.model_copy(update={"eval_every": 0}), [], model, ALONE)  # type: ignore[arg-type]
    assert not any(never.due(step) for step in range(1, 11))
    assert never.loss_at(10) is None  # no held-out tokens: no evaluation, no collective


def test_eval_every_is_refused_with_asynchronous_workers(tmp_path) -> None:
    with pytest.raises(ValueError, match="--eval-every needs workers that meet"):
        quick_config(tmp_path / "c.txt", tmp_path, eval_every=5, sync="async", ps=1)


def test_ranks_whose_forwards_meet_run_as_many_as_the_busiest_and_count_only_their_own() -> None:
    held_out = HeldOutSet.choose(_sequences(50), budget=0, seed=0, batch_tokens=700)
    assert len(held_out.batches) % 3, "the batches must not deal evenly over 3 ranks"
    models = [_CountingModel(3, rank, meet=True) for rank in range(3)]
    for model in models:
        assert held_out_loss(model, held_out, ALONE) == pytest.approx(1.0)
    rounds = -(-len(held_out.batches) // 3)
    assert [len(model.seen) for model in models] == [rounds] * 3  # a sharded model's gathers
    plain = [_CountingModel(3, rank) for rank in range(3)]
    for model in plain:
        held_out_loss(model, held_out, ALONE)
    assert sorted(len(model.seen) for model in plain) != [rounds] * 3  # dealt unevenly
