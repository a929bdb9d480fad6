"""Checkpoints written by stages or shards load into one process, and the other way round.

Stages keep the model's parameter names, so DCP's checkpoint is the same set of named tensors
whatever the layout that wrote it: only which rank writes or reads which name changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from parallel_cases import LR, layout_for, parallelism, step_batches, tiny_model, whole_tensors
from ranks import run_ranks
from shardwise.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from shardwise.data.batch import Batch
from shardwise.distributed import DistEnv
from shardwise.loss import token_loss_sum
from shardwise.parallel.model import ParallelModel
from shardwise.parallel.parallelize import parallelize

pytestmark = pytest.mark.timeout(90)

SINGLE = DistEnv(0, 1, 0, 1, torch.device("cpu"))


def moments(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {
        name: optimizer.state[p]["exp_avg"].clone()
        for name, p in module.named_parameters()
        if p in optimizer.state
    }


def stages(env: DistEnv, cuts: list[str], schedule: str) -> ParallelModel:
    layout = layout_for(env, pp=2)
    setting = parallelism(layout, cuts=cuts, schedule=schedule, microbatches=2)
    return parallelize(tiny_model("gru"), setting, env)


def save_from_two_stages(env: DistEnv, directory: Path) -> dict[str, Any]:
    model = stages(env, ["blocks.1"], "gpipe")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for batch in step_batches()[:2]:
        model.forward_backward(batch.tokens, batch.targets, batch.step_tokens)
        optimizer.step()
        optimizer.zero_grad()
    save_checkpoint(directory, model.part, optimizer, TrainerState(step=2), env)
    return {"state": model.state_dict(), "moments": moments(model, optimizer)}


def load_into_two_stages(env: DistEnv, path: Path) -> dict[str, Any]:
    # A different cut from the one that saved: stage 0 now ends after blocks.1.
    model = stages(env, ["blocks.2"], "1f1b")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    state = load_checkpoint(path, model.part, optimizer, env)
    return {"step": state.step, "state": model.state_dict(), "moments": moments(model, optimizer)}


def save_from_two_shards(env: DistEnv, directory: Path) -> dict[str, torch.Tensor]:
    model = parallelize(tiny_model("transformer"), parallelism(layout_for(env, tp=2)), env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    batch = step_batches()[0]
    model.forward_backward(batch.tokens, batch.targets, batch.step_tokens)
    optimizer.step()
    save_checkpoint(directory, model.part, optimizer, TrainerState(step=1), env)
    return whole_tensors(model.state_dict())


def two_rank_worker(env: DistEnv, folders: dict[str, Path]) -> dict[str, Any]:
    """Every 2-rank part of this module, one after another in one process start."""
    return {
        "shards": save_from_two_shards(env, folders["shards"]),
        "stages": save_from_two_stages(env, folders["stages"]),
        "loaded": load_into_two_stages(env, folders["one process"]),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process's checkpoint after 2 steps, then the 2-rank saves and the 2-rank load of it."""
    root = tmp_path_factory.mktemp("pipeline_checkpoint")
    folders = {name: root / name for name in ("shards", "stages", "one process")}
    model = tiny_model("gru")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for batch in step_batches()[:2]:
        train_single_step(model, optimizer, batch)
    path = save_checkpoint(folders["one process"], model, optimizer, TrainerState(step=2), SINGLE)
    folders["one process"] = path
    ranks = run_ranks(two_rank_worker, world=2, args=(folders,))
    return {
        "folders": folders,
        "ranks": ranks,
        "single": (model.state_dict(), moments(model, optimizer)),
    }


def test_tensor_parallel_shards_load_whole_into_one_process(saved: dict) -> None:
    shards = [rank["shards"] for rank in saved["ranks"]]
    model = tiny_model("transformer")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    load_checkpoint(saved["folders"]["shards"] / "step_00000001", model, optimizer, SINGLE)
    for name, value in shards[0].items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=0, rtol=0)
    assert len(optimizer.state) == len(list(model.parameters()))


def test_two_stage_checkpoint_resumes_in_one_process(saved: dict) -> None:
    stages = [rank["stages"] for rank in saved["ranks"]]
    model = tiny_model("gru")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    state = load_checkpoint(saved["folders"]["stages"] / "step_00000002", model, optimizer, SINGLE)

    assert state.step == 2
    for rank in stages:
        for name, value in rank["state"].items():
            torch.testing.assert_close(model.state_dict()[name], value, atol=0, rtol=0)
        for name, value in rank["moments"].items():
            torch.testing.assert_close(moments(model, optimizer)[name], value, atol=0, rtol=0)
    assert sorted(n for rank in stages for n in rank["state"]) == sorted(model.state_dict())


def test_one_process_checkpoint_resumes_on_two_stages_cut_elsewhere(saved: dict) -> None:
    weights, single_moments = saved["single"]
    loaded = [rank["loaded"] for rank in saved["ranks"]]
    assert [rank["step"] for rank in loaded] == [2, 2]
    assert sorted(n for rank in loaded for n in rank["state"]) == sorted(weights)
    for rank in loaded:
        for name, value in rank["state"].items():
            torch.testing.assert_close(value, weights[name], atol=0, rtol=0)
        for name, value in rank["moments"].items():
            torch.testing.assert_close(value, single_moments[name], atol=0, rtol=0)


def train_single_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch
) -> None:
    (token_loss_sum(model(batch.tokens), batch.targets) / batch.step_tokens).backward()
    optimizer.step()
    optimizer.zero_grad()
