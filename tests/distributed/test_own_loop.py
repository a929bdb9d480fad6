"""Transparency of the own-loop API: a user's loop on 2 ranks computes what 1 process computes.

Each worker is a user's loop written against `Session` alone (prepare, forward_backward,
clip_gradients, step, save, loader), as README shows; the reference is plain PyTorch on the
whole batch in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from parallel_cases import (
    CLIP,
    LR,
    Trained,
    assert_ranks_match,
    replica_share,
    step_batches,
    tiny_model,
    train_single,
    whole_tensors,
)
from ranks import COLLECTIVE_TIMEOUT_S, run_ranks
from shardwise.config import TrainConfig
from shardwise.distributed import DistEnv
from shardwise.session import Session

pytestmark = pytest.mark.timeout(120)


def session_for(env: DistEnv, **layout: Any) -> Session:
    config = TrainConfig(device="cpu", timeout_s=COLLECTIVE_TIMEOUT_S, **layout)
    return Session(env, config)


def user_loop(env: DistEnv, kind: str, layout: dict[str, Any], save_to: Path | None) -> Trained:
    """What a user writes: prepare, then forward_backward / clip / step per batch."""
    session = session_for(env, **layout)
    model = session.prepare(tiny_model(kind))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    trained = Trained(state={})
    dp, dp_rank = session.layout.dp, session.layout.dp_rank
    for batch in step_batches():
        mine = replica_share(batch, dp, dp_rank)
        loss = session.forward_backward(model, mine.tokens, mine.targets)
        norm = session.clip_gradients(model, optimizer, CLIP)
        session.step(optimizer, model)
        optimizer.zero_grad()
        trained.losses.append(float(loss))
        trained.norms.append(float(norm))
    trained.state = whole_tensors(model.state_dict())
    if save_to is not None:
        session.save(save_to, model, optimizer, step=len(step_batches()))
    return trained


def loader_batches(env: DistEnv, layout: dict[str, Any]) -> list[torch.Tensor]:
    session = session_for(env, **layout)
    dataset = TensorDataset(torch.arange(32).view(16, 2))
    return [x for (x,) in session.loader(dataset, batch_size=2)]


def test_data_parallel_loop_on_two_ranks_equals_one_rank_with_twice_the_batch() -> None:
    ranks = run_ranks(user_loop, world=2, args=("gru", {}, None))
    assert_ranks_match(ranks, train_single("gru"))


def user_loops(env: DistEnv, jobs: tuple[tuple, ...]) -> list[Trained]:
    """Several user loops one after another on the same ranks (one process start for all)."""
    return [user_loop(env, *job) for job in jobs]


def test_pipeline_loops_on_two_stages_equal_one_process(tmp_path: Path) -> None:
    given = {"pp": 2, "microbatches": 4, "split_points": ["blocks.1"]}
    profiled = {"pp": 2, "microbatches": 2}  # no split points: rank 0's profile cuts for all
    jobs = (("lstm", given, tmp_path), ("transformer", given, None), ("gru", profiled, None))
    ranks = run_ranks(user_loops, world=2, args=(jobs,), timeout_s=120)
    for (kind, _, _), results in zip(jobs, zip(*ranks, strict=True), strict=True):
        assert_ranks_match(list(results), train_single(kind))
    kind, reference = "lstm", train_single("lstm")
    # Written once, under the names the user's model gives its parameters: it loads whole.
    alone = Session(DistEnv(0, 1, 0, 1, torch.device("cpu")), TrainConfig(device="cpu"))
    model = tiny_model(kind)
    state = alone.load(tmp_path, model, torch.optim.AdamW(model.parameters(), lr=LR))
    assert state.step == len(step_batches())
    for name, value in reference.state.items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-5, rtol=0, msg=name)


def test_the_loader_gives_both_stages_the_same_batches_and_replicas_different_ones() -> None:
    stages = run_ranks(loader_batches, world=2, args=({"pp": 2, "microbatches": 2},))
    replicas = run_ranks(loader_batches, world=2, args=({},))
    assert all(torch.equal(a, b) for a, b in zip(*stages, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(*replicas, strict=True))
    assert len(stages[0]) == 8 and len(replicas[0]) == 4
