"""Background (DCP async) saves write what a foreground save writes, and seal only when whole."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import small_model_and_optimizer
from ranks import run_ranks
from shardwise.checkpoint import (
    CheckpointWriter,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    take_snapshot,
    verify_checkpoint,
)
from shardwise.checkpoint.metadata import read_metadata
from shardwise.checkpoint.verified import read_manifest
from shardwise.distributed import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    optimizer.zero_grad()  # small_model_and_optimizer leaves its own step's gradients
    model(torch.randn(3, 4, generator=generator)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _digests(path: Path) -> dict[str, str]:
    return {name: digest.sha256 for name, digest in read_manifest(path).files.items()}


@pytest.mark.timeout(120)
def test_a_background_save_holds_the_state_of_its_step_not_a_later_one(tmp_path: Path) -> None:
    model, optimizer = small_model_and_optimizer(0)
    torch.manual_seed(5)
    reference = save_checkpoint(tmp_path / "sync", model, optimizer, TrainerState(step=3), ENV)
    torch.manual_seed(5)  # the same RNG state for the background save's snapshot
    writer = CheckpointWriter()
    state = TrainerState(step=3)
    path = writer.save(take_snapshot(tmp_path / "async", model, optimizer, state), ENV, True)
    state.tokens = 999  # the live state moves on while the files are written
    _train_step(model, optimizer, 1)  # and so do the weights and AdamW's moments, in place
    assert writer.wait() == path

    verify_checkpoint(path)
    # Every file byte for byte, but DCP's .metadata, which records where it was written.
    assert _digests(path).keys() == _digests(reference).keys()
    del (digests := _digests(path))[".metadata"]
    assert digests.items() <= _digests(reference).items()
    assert read_metadata(path).state_dict_metadata == read_metadata(reference).state_dict_metadata
    assert not writer.in_flight


@pytest.mark.timeout(120)
def test_the_next_save_waits_for_the_one_in_flight_and_both_are_sealed(tmp_path: Path) -> None:
    model, optimizer = small_model_and_optimizer(0)
    writer = CheckpointWriter()
    for step in (1, 2):
        snapshot = take_snapshot(tmp_path, model, optimizer, TrainerState(step=step))
        writer.save(snapshot, ENV, background=True)
        _train_step(model, optimizer, step)
    last = take_snapshot(tmp_path, model, optimizer, TrainerState(step=3))
    writer.save(last, ENV)  # in the foreground: waits for the one in flight first
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "step_00000001",
        "step_00000002",
        "step_00000003",
    ]
    for path in tmp_path.iterdir():
        verify_checkpoint(path)


def _resume_worker(env: DistEnv, root: str) -> dict[str, list[float]]:
    """Train 4 steps saving step 2 in the background, then resume from it and replay 3-4."""
    torch.manual_seed(0)
    model, optimizer = small_model_and_optimizer(0)
    writer = CheckpointWriter(timeout_s=20)
    for step in range(1, 5):
        _train_step(model, optimizer, step)  # replicas, as under DDP
        if step == 2:
            state = TrainerState(step=2, world_size=env.world_size)
            writer.save(take_snapshot(Path(root), model, optimizer, state), env, background=True)
    writer.wait()
    again, again_optimizer = small_model_and_optimizer(7)
    state = load_checkpoint(Path(root) / "step_00000002", again, again_optimizer, env)
    for step in range(state.step + 1, 5):
        _train_step(again, again_optimizer, step)
    return {
        "uninterrupted": torch.cat([p.flatten() for p in model.parameters()]).tolist(),
        "resumed": torch.cat([p.flatten() for p in again.parameters()]).tolist(),
    }


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_ranks_resume_exactly_from_a_background_save(tmp_path: Path) -> None:
    results = run_ranks(_resume_worker, world=2, args=(str(tmp_path),), timeout_s=150)
    for result in results:
        assert result["resumed"] == result["uninterrupted"]
    assert sorted(p.name for p in (tmp_path / "step_00000002" / "rng").iterdir()) == [
        "rank0.safetensors",
        "rank1.safetensors",
    ]
    verify_checkpoint(tmp_path / "step_00000002")


_CRASH = """
import os, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import small_model_and_optimizer
import shardwise.checkpoint.save as save
from shardwise.checkpoint import CheckpointWriter, TrainerState, take_snapshot
from shardwise.distributed import DistEnv
env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
model, optimizer = small_model_and_optimizer(0)
writer = CheckpointWriter()
writer.save(take_snapshot(Path({root!r}), model, optimizer, TrainerState(step=1)), env)
def killed(*args, **kwargs):
    os._exit(9)  # the process dies while the background thread writes step 2
save.write_manifest = killed
step2 = take_snapshot(Path({root!r}), model, optimizer, TrainerState(step=2))
writer.save(step2, env, background=True)
writer.wait()
"""


@pytest.mark.timeout(120)
def test_a_crash_mid_background_write_leaves_only_a_partial_dir(tmp_path: Path) -> None:
    tests = str(Path(__file__).parents[1])
    code = textwrap.dedent(_CRASH.format(tests=tests, root=str(tmp_path)))
    result = subprocess.run([sys.executable, "-c", code], timeout=100, check=False)
    assert result.returncode == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002.partial"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert json.loads((tmp_path / "step_00000001" / "trainer_state.json").read_text())["step"] == 1
