"""Checkpoints are atomic, complete, and never unpickle arbitrary objects."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

import shardwise.checkpoint as checkpoint
import shardwise.checkpoint.save  # noqa: F401  (patched below)
from helpers import reseal, small_model_and_optimizer
from shardwise.checkpoint import (
    TrainerState,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from shardwise.data.sampler import SamplerPosition
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def test_save_then_load_restores_everything(tmp_path: Path) -> None:
    model, optimizer = small_model_and_optimizer(0)
    state = TrainerState(step=7, position=SamplerPosition(1, 40), tokens=123, world_size=2)
    path = save_checkpoint(tmp_path, model, optimizer, state, ENV)
    expected_rng = torch.get_rng_state()
    torch.rand(5)

    other, other_optimizer = small_model_and_optimizer(1)
    loaded = load_checkpoint(path, other, other_optimizer, ENV)
    assert loaded == state
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    exp_avg = optimizer.state[next(iter(model.parameters()))]["exp_avg"]
    assert torch.equal(exp_avg, other_optimizer.state[next(iter(other.parameters()))]["exp_avg"])
    assert torch.equal(torch.get_rng_state(), expected_rng)


def test_a_save_killed_midway_leaves_no_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model, optimizer = small_model_and_optimizer(0)
    save_checkpoint(tmp_path, model, optimizer, TrainerState(step=1), ENV)

    def dies(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # stands in for a kill while the shards are being written

    monkeypatch.setattr(checkpoint.save, "_save_rng", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, optimizer, TrainerState(step=2), ENV)
    assert (tmp_path / "step_00000002.partial").is_dir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert find_checkpoint(tmp_path) == tmp_path / "step_00000001"


def test_no_complete_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step_00000005.partial").mkdir(parents=True)
    with pytest.raises(ShardwiseError, match="no complete checkpoint"):
        find_checkpoint(tmp_path)


class _Boom:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    model, optimizer = small_model_and_optimizer(0)
    path = save_checkpoint(tmp_path, model, optimizer, TrainerState(step=1), ENV)
    (path / ".metadata").write_bytes(pickle.dumps(_Boom()))
    reseal(path)  # an attacker rewrites the manifest too: safety must not rest on it
    with pytest.raises(ShardwiseError, match=r"refused to load.*not allowed"):
        load_checkpoint(path, *small_model_and_optimizer(1), ENV)


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path: Path) -> None:
    model, optimizer = small_model_and_optimizer(0)
    path = save_checkpoint(tmp_path, model, optimizer, TrainerState(step=1), ENV)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
    with pytest.raises(ShardwiseError, match="does not fit this model"):
        load_checkpoint(path, wider, torch.optim.AdamW(wider.parameters()), ENV)
