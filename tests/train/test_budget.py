"""--max-tokens and --epochs come to a number of steps, planned ahead from the samplers."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import metrics, quick_config, train, write_corpus
from shardwise.config import TrainConfig, load_config
from shardwise.errors import ShardwiseError
from shardwise.train.build import (
    build_sampler,
    load_corpus,
    sequence_lengths,
    with_step_budget,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("budget") / "corpus.txt")


def step_tokens(config: TrainConfig, world_size: int, steps: int) -> list[int]:
    """The tokens of each of the first `steps` steps, as rank 0's sampler plans them."""
    sampler = build_sampler(config, sequence_lengths(load_corpus(config)), world_size, rank=0)
    accum = config.grad_accum
    requests = iter(sampler)
    found = []
    for _ in range(steps):
        found.append(next(requests).step_tokens)
        for _ in range(accum - 1):
            next(requests)
    return found


@pytest.mark.parametrize("batching", ["fixed", "tokens"])
def test_the_last_step_is_the_one_that_reaches_the_token_budget(
    corpus: Path, tmp_path: Path, batching: str
) -> None:
    config = quick_config(corpus, tmp_path, batching=batching, max_tokens=20_000, grad_accum=2)
    steps = with_step_budget(config, load_corpus(config), world_size=2).max_steps
    tokens = step_tokens(config, 2, steps)
    assert sum(tokens[:-1]) < 20_000 <= sum(tokens)


def test_an_epoch_of_fixed_batches_is_every_whole_global_batch_of_the_data(
    corpus: Path, tmp_path: Path
) -> None:
    config = quick_config(corpus, tmp_path, epochs=2.0)
    sequences = len(load_corpus(config).train)
    global_batch = config.batch_size * 2
    assert with_step_budget(config, load_corpus(config), 2).max_steps == 2 * (
        sequences // global_batch
    )
    half = quick_config(corpus, tmp_path, epochs=0.5)
    assert with_step_budget(half, load_corpus(half), 2).max_steps == -(
        -(sequences // 2) // global_batch
    )


def test_token_batches_cover_an_epoch_with_every_sample_once(corpus: Path, tmp_path: Path) -> None:
    config = quick_config(corpus, tmp_path, batching="tokens", epochs=1.0)
    prepared = load_corpus(config)
    steps = with_step_budget(config, prepared, 2).max_steps
    targets = int(sum(len(seq) - 1 for seq in prepared.train))
    assert sum(step_tokens(config, 2, steps)) >= targets > sum(step_tokens(config, 2, steps - 1))


def test_a_run_stops_at_its_budget_and_its_schedule_spans_it(corpus: Path, tmp_path: Path) -> None:
    config = quick_config(corpus, tmp_path, max_tokens=6_000, max_steps=300)
    expected = with_step_budget(config, load_corpus(config), 1).max_steps
    summary = train(config, nproc=1)
    assert summary["steps"] == expected < 300
    assert summary["tokens"] >= 6_000
    rows = metrics(tmp_path)
    assert rows[-1]["lr"] == pytest.approx(config.lr * config.min_lr_ratio, rel=1e-6)
    # Each row says how far the run got, in tokens and training seconds (a loss curve's axes).
    tokens, seconds = [row["tokens"] for row in rows], [row["train_s"] for row in rows]
    assert tokens == sorted(tokens) and tokens[-1] == summary["tokens"]
    assert seconds == sorted(seconds) and seconds[0] > 0


def test_two_ways_to_stop_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ShardwiseError, match="--max-steps and --max-tokens both say when"):
        load_config(None, {"max_steps": 10, "max_tokens": 100})
