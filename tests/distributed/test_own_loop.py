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
    return Session.from_config(env, config)


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


def user_loops(env: DistEnv, jobs: tuple[tuple, ...]) -> list[Trained]:
    """Several user loops one after another on the same ranks (one process start for all)."""
    return [user_loop(env, *job) for job in jobs]


GIVEN = {"pp": 2, "microbatches": 4, "split_points": ["blocks.1"]}
PROFILED = {"pp": 2, "microbatches": 2}  # no split points: rank 0's profile cuts for all
STAGES, REPLICAS = {"pp": 2, "microbatches": 2}, {}


def pipeline_jobs(save_to: Path) -> tuple[tuple, ...]:
    return (("lstm", GIVEN, save_to), ("transformer", GIVEN, None), ("gru", PROFILED, None))


def two_rank_worker(env: DistEnv, save_to: Path) -> dict[str, Any]:
    """Every 2-rank loop of this module, one after another in one process start."""
    return {
        "data parallel": user_loop(env, "gru", {}, None),
        "pipeline": user_loops(env, pipeline_jobs(save_to)),
        "stages": loader_batches(env, STAGES),
        "replicas": loader_batches(env, REPLICAS),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    saved = tmp_path_factory.mktemp("own_loop")
    return run_ranks(two_rank_worker, world=2, args=(saved,), timeout_s=120), saved


def test_data_parallel_loop_on_two_ranks_equals_one_rank_with_twice_the_batch(
    two_ranks: tuple,
) -> None:
    ranks, _ = two_ranks
    assert_ranks_match([rank["data parallel"] for rank in ranks], train_single("gru"))


def test_pipeline_loops_on_two_stages_equal_one_process(two_ranks: tuple) -> None:
    ranks, saved = two_ranks
    jobs = pipeline_jobs(saved)
    per_job = zip(*(rank["pipeline"] for rank in ranks), strict=True)
    for (kind, _, _), results in zip(jobs, per_job, strict=True):
        assert_ranks_match(list(results), train_single(kind))
    kind, reference = "lstm", train_single("lstm")
    # Written once, under the names the user's model gives its parameters: it loads whole.
    alone = Session.from_config(DistEnv(0, 1, 0, 1, torch.device("cpu")), TrainConfig(device="cpu"))
    model = tiny_model(kind)
    state = alone.load(saved, model, torch.optim.AdamW(model.parameters(), lr=LR))
    assert state.step == len(step_batches())
    for name, value in reference.state.items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-5, rtol=0, msg=name)


def test_the_loader_gives_both_stages_the_same_batches_and_replicas_different_ones(
    two_ranks: tuple,
) -> None:
    ranks, _ = two_ranks
    stages = [rank["stages"] for rank in ranks]
    replicas = [rank["replicas"] for rank in ranks]
    assert all(torch.equal(a, b) for a, b in zip(*stages, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(*replicas, strict=True))
    assert len(stages[0]) == 8 and len(replicas[0]) == 4
