"""Synchronisation strategies against each other and against themselves resumed (2 gloo ranks).

Each worker is an own loop on `Session` (prepare, forward_backward, step, save, load) over the
fixed batches of parallel_cases, cycled; every replica returns its own weights, since under
local SGD and DiLoCo replicas differ between meetings.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import quick_config, train
from parallel_cases import (
    Trained,
    assert_same_state,
    step_batches,
    train_single,
)
from ranks import run_ranks
from shardwise.distributed import DistEnv
from sync_loops import sync_loop, sync_loops

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def run_syncs(*jobs: tuple, world: int = 2) -> list[list[Trained]]:
    """Each job's per-rank results; every job is `(settings, steps, *sync_loop's other args)`."""
    # Generous: two cores are shared with other jobs; the collectives still time out in 20 s.
    ranks = run_ranks(sync_loops, world=world, args=(jobs,), timeout_s=240)
    return [list(results) for results in zip(*ranks, strict=True)]


def run_sync(settings: dict[str, Any], steps: range, *args: Any, world: int = 2) -> list[Trained]:
    return run_syncs((settings, steps, *args), world=world)[0]


def assert_each_rank_close(got: list[Trained], want: list[Trained], atol: float) -> None:
    for mine, theirs in zip(got, want, strict=True):
        assert_same_state(mine.state, theirs.state, atol)


PERIOD = {"sync_every": 2, "sync_warmup_steps": 1}
EVERY_4 = {"sync": "local-sgd", "sync_every": 4}
ALL_STEPS = range(len(step_batches()))
POWERSGD = {"grad_compression": "powersgd", "powersgd_rank": 2, "powersgd_warmup_steps": 2}
# The 2-rank runs the tests below compare, run one after another in one process start.
JOBS: dict[str, tuple] = {
    "local H=1 sgd": ({"sync": "local-sgd", "sync_every": 1}, range(6), "sgd"),
    "allreduce sgd": ({"sync": "allreduce"}, range(6), "sgd"),
    "apart": (EVERY_4, range(3)),
    "met": (EVERY_4, range(4)),
    "finished": (EVERY_4, range(3), "adamw", None, None, True),
    "diloco lr 1": ({"sync": "diloco", **PERIOD, "outer_lr": 1.0, "outer_momentum": 0.0}, range(5)),
    "local": ({"sync": "local-sgd", **PERIOD}, range(5)),
    "diloco momentum": ({"sync": "diloco", "sync_every": 2}, range(4)),
    "local every 2": ({"sync": "local-sgd", "sync_every": 2}, range(4)),
    "no compression": ({"sync": "allreduce", "grad_compression": "none"}, ALL_STEPS),
    "todays": ({"sync": "allreduce"}, ALL_STEPS),
    "fp16": ({"sync": "allreduce", "grad_compression": "fp16"}, ALL_STEPS),
    "powersgd": (POWERSGD, range(5)),
}


# Resumed mid-period: warm-up step 0, local steps 1-3 (meeting after step 3), 4-6 (meeting after
# step 6); saved after step 5, the replicas are apart and the DiLoCo anchor is step 3's.
RESUMED = {
    "local-sgd": {"sync": "local-sgd", "sync_every": 3, "sync_warmup_steps": 1},
    "diloco": {"sync": "diloco", "sync_every": 3, "sync_warmup_steps": 1, "outer_bf16": True},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Trained]]:
    """Every job of JOBS, then each of RESUMED's whole, saved and resumed runs (in that order:
    the save comes before the resume), all in one process start."""
    jobs = dict(JOBS)
    for name, settings in RESUMED.items():
        saves = tmp_path_factory.mktemp(f"resume-{name}")
        jobs[f"{name} whole"] = (settings, range(8))
        jobs[f"{name} saved"] = (settings, range(5), "adamw", saves)
        jobs[f"{name} resumed"] = (settings, range(5, 8), "adamw", None, saves / "step_00000005")
    ranks = run_ranks(loops_then_bf16, world=2, args=(tuple(jobs.values()),), timeout_s=240)
    results = [list(trained) for trained in zip(*(rank[0] for rank in ranks), strict=True)]
    return {**dict(zip(jobs, results, strict=True)), "bf16 refusals": [rank[1] for rank in ranks]}


def loops_then_bf16(env: DistEnv, jobs: tuple[tuple, ...]) -> tuple[list[Trained], str | None]:
    """`sync_loops(jobs)`, then (last: it leaves these ranks' DDP half-made) what a bf16
    compression run says, on a PyTorch built without CUDA."""
    trained = sync_loops(env, jobs)
    if torch.version.cuda is not None:
        return trained, None
    try:
        sync_loop(env, {"sync": "allreduce", "grad_compression": "bf16"}, range(1))
    except Exception as exc:
        return trained, str(exc)
    return trained, "trained"


def test_local_sgd_every_step_with_plain_sgd_equals_allreduce(runs: dict) -> None:
    # Averaging parameters after one SGD step is averaging the gradients before it.
    assert_each_rank_close(runs["local H=1 sgd"], runs["allreduce sgd"], atol=1e-6)


def test_pipeline_stages_average_with_their_replicas() -> None:
    # dp 2 x pp 2: each stage averages over its own "dp" group, never with the other stage.
    layout = {"dp": 2, "pp": 2, "split_points": ["blocks.1"], "microbatches": 2}
    local, allreduce = run_syncs(
        ({**layout, "sync": "local-sgd", "sync_every": 1}, range(3), "sgd"),
        ({**layout, "sync": "allreduce"}, range(3), "sgd"),
        world=4,
    )
    assert_each_rank_close(local, allreduce, atol=1e-6)


def test_local_sgd_replicas_differ_between_meetings_and_agree_at_them(runs: dict) -> None:
    apart, met = runs["apart"], runs["met"]
    with pytest.raises(AssertionError):
        assert_same_state(apart[0].state, apart[1].state, atol=1e-6)
    assert_same_state(met[0].state, met[1].state, atol=0)


def test_a_run_ending_mid_period_ends_with_the_replicas_mean(runs: dict) -> None:
    apart = runs["apart"]
    mean = {k: (apart[0].state[k] + apart[1].state[k]) / 2 for k in apart[0].state}
    for rank in runs["finished"]:
        assert_same_state(rank.state, mean, atol=1e-6)


def test_diloco_with_outer_lr_one_and_no_momentum_equals_local_sgd(runs: dict) -> None:
    # anchor - mean(anchor - local) rounds differently from mean(local): a few ulps.
    assert_each_rank_close(runs["diloco lr 1"], runs["local"], atol=1e-6)


def test_diloco_with_momentum_differs_from_local_sgd(runs: dict) -> None:
    diloco, local = runs["diloco momentum"], runs["local every 2"]
    assert_same_state(diloco[0].state, diloco[1].state, atol=0)  # replicas take the anchor
    with pytest.raises(AssertionError):
        assert_same_state(diloco[0].state, local[0].state, atol=1e-6)


def test_no_compression_is_todays_path_and_fp16_is_close_to_it(runs: dict) -> None:
    reference = train_single("gru", clip_norm=math.inf)
    plain, todays, half = runs["no compression"], runs["todays"], runs["fp16"]
    for mine, theirs in zip(plain, todays, strict=True):
        assert_same_state(mine.state, theirs.state, atol=0)
    assert_ranks_match_weights(plain, reference, atol=1e-5)
    # PyTorch's bf16 hook needs a CUDA build with NCCL; fp16 is the same hook at another width.
    assert_same_state(half[0].state, half[1].state, atol=0)  # still one model
    assert_ranks_match_weights(half, reference, atol=2e-3)
    with pytest.raises(AssertionError):  # and the gradients were rounded on the way
        assert_ranks_match_weights(half, reference, atol=1e-7)


def test_powersgd_trains_replicas_alike(runs: dict) -> None:
    ranks = runs["powersgd"]
    assert_same_state(ranks[0].state, ranks[1].state, atol=0)
    assert all(math.isfinite(loss) for loss in ranks[0].losses)


@pytest.mark.skipif(torch.version.cuda is not None, reason="this PyTorch has the bf16 hook")
def test_bf16_compression_without_cuda_is_refused_with_the_fix(runs: dict) -> None:
    for said in runs["bf16 refusals"]:
        assert re.search(r"--grad-compression bf16: .* use --grad-compression fp16", said), said


def assert_ranks_match_weights(ranks: list[Trained], reference: Trained, atol: float) -> None:
    for rank in ranks:
        assert_same_state(rank.state, reference.state, atol)


@pytest.mark.parametrize("name", RESUMED)
def test_resume_mid_period_equals_the_uninterrupted_run_bit_for_bit(name: str, runs: dict) -> None:
    # Saved after step 5 (see RESUMED), resumed to step 8; the whole run trained steps 0-7.
    whole, resumed = runs[f"{name} whole"], runs[f"{name} resumed"]
    with pytest.raises(AssertionError):  # the test would not notice a lost replica otherwise
        assert_same_state(whole[0].state, whole[1].state, atol=1e-6)
    assert_each_rank_close(resumed, whole, atol=0)
    assert [r.losses for r in resumed] == [w.losses[5:] for w in whole]


def test_a_local_sgd_checkpoint_refuses_another_data_parallel_degree(tmp_path: Path) -> None:
    settings = {"sync": "local-sgd", "sync_every": 3}
    run_ranks(sync_loop, world=1, args=(settings, range(2), "adamw", tmp_path))
    path = tmp_path / "step_00000002"
    with pytest.raises(Exception, match="no own weights for data-parallel replica 1"):
        run_sync(settings, range(2, 3), "adamw", None, path)


def test_diloco_run_end_to_end_records_its_strategy(corpus: Path, tmp_path: Path) -> None:
    config = quick_config(corpus, tmp_path / "run", sync="diloco", sync_every=2, max_steps=4)
    summary = train(config, nproc=2)
    assert summary["sync"] == "diloco"
    assert summary["steps"] == 4
    assert math.isfinite(summary["eval_loss"])
