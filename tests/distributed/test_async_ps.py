"""Asynchronous updates through parameter servers, end to end through `shardwise.run`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import final_weights, quick_config, train, write_corpus

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

SETTINGS = {"max_steps": 24, "lr": 5e-3, "log_every": 4, "clip_norm": 1.0}
ASYNC = {"sync": "async", "ps": 1}
# name: (nproc, settings); every run trains the same 24 steps' tokens from the same seed.
RUNS = {
    "one process": (1, {}),
    "one worker, two servers": (1, {**ASYNC, "ps": 2, "max_staleness": 0}),
    "synchronous": (2, {}),
    "two workers in step": (2, {**ASYNC, "max_staleness": 0}),
    "two workers apart": (2, ASYNC),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    root = tmp_path_factory.mktemp("async")
    corpus = write_corpus(root / "corpus.txt")
    done = {}
    for index, (name, (nproc, settings)) in enumerate(RUNS.items()):
        run_dir = root / f"run{index}"
        done[name] = (train(quick_config(corpus, run_dir, **SETTINGS, **settings), nproc), run_dir)
    return done


def assert_same_weights(got: Path, want: Path) -> None:
    mine, theirs = final_weights(got), final_weights(want)
    assert mine.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=1e-6, msg=name)


def test_one_worker_without_staleness_trains_as_one_process(runs: dict) -> None:
    summary, served = runs["one worker, two servers"]
    assert summary["sync"] == "async" and summary["steps"] == SETTINGS["max_steps"]
    assert_same_weights(served, runs["one process"][1])


def test_workers_held_in_step_train_as_synchronous_data_parallel(runs: dict) -> None:
    summary, held = runs["two workers in step"]
    assert summary["sync_staleness_histogram"] == {"0": 2 * SETTINGS["max_steps"]}
    assert_same_weights(held, runs["synchronous"][1])


def test_workers_apart_still_learn_close_to_synchronous_training(runs: dict) -> None:
    summary, apart = runs["two workers apart"]
    synchronous = runs["synchronous"][0]["eval_loss"]
    # Measured on this corpus with two CPU hogs beside the run: 0.53-0.55 against 0.50 after
    # 24 steps, five runs. After 12 steps the gap was 1.3x-1.65x and moved with the order the
    # pushes happened to arrive in (same staleness histogram every time): stale gradients cost
    # most early on, when the loss falls fastest. Lost or unapplied pushes stay near a
    # uniform guess's 5.5.
    assert summary["eval_loss"] < math.log(summary["vocab_size"]) - 2
    assert summary["eval_loss"] < synchronous * 1.25
    assert sum(summary["sync_staleness_histogram"].values()) >= SETTINGS["max_steps"]
    assert all(torch.isfinite(tensor).all() for tensor in final_weights(apart).values())
