"""`--keep-checkpoints K`: what is deleted, and what never is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import small_model_and_optimizer
from shardwise.checkpoint import (
    MANIFEST_FILE,
    Retention,
    TrainerState,
    find_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from shardwise.checkpoint.retention import prune
from shardwise.distributed import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
pytestmark = pytest.mark.timeout(60)


def _sealed(directory: Path, *steps: int) -> list[Path]:
    paths = []
    for step in steps:
        path = directory / f"step_{step:08d}"
        path.mkdir(parents=True)
        (path / MANIFEST_FILE).write_text("{}")
        paths.append(path)
    return paths


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_keeps_the_k_newest_and_deletes_the_rest(tmp_path: Path) -> None:
    *_, newest = _sealed(tmp_path, 10, 20, 30, 40)
    deleted = prune(newest, Retention(keep=2))
    assert sorted(path.name for path in deleted) == ["step_00000010", "step_00000020"]
    assert _names(tmp_path) == ["step_00000030", "step_00000040"]


def test_zero_keeps_everything(tmp_path: Path) -> None:
    *_, newest = _sealed(tmp_path, 10, 20, 30)
    assert prune(newest, Retention(keep=0)) == []
    assert len(_names(tmp_path)) == 3


def test_keep_one_leaves_the_newest_alone(tmp_path: Path) -> None:
    *_, newest = _sealed(tmp_path, 10, 20)
    prune(newest, Retention(keep=1))
    assert _names(tmp_path) == ["step_00000020"]


def test_the_checkpoint_resume_named_stays(tmp_path: Path) -> None:
    resumed_from, _, newest = _sealed(tmp_path, 10, 20, 30)
    prune(newest, Retention(keep=1, protect=resumed_from))
    assert _names(tmp_path) == ["step_00000010", "step_00000030"]


def test_a_higher_step_from_an_earlier_run_is_not_counted_or_deleted(tmp_path: Path) -> None:
    _, _, newest, later = _sealed(tmp_path, 10, 20, 30, 90)
    prune(newest, Retention(keep=2))
    assert _names(tmp_path) == ["step_00000020", "step_00000030", "step_00000090"]
    assert later.is_dir()


def test_unsealed_and_partial_dirs_are_not_touched_but_a_cut_short_delete_is_finished(
    tmp_path: Path,
) -> None:
    _, newest = _sealed(tmp_path, 10, 30)
    (tmp_path / "step_00000020").mkdir()  # no manifest: not a checkpoint we judge
    (tmp_path / "step_00000040.partial").mkdir()  # a save in flight
    (tmp_path / "step_00000005.deleting").mkdir()  # a delete a crash cut short
    prune(newest, Retention(keep=1))
    assert _names(tmp_path) == ["step_00000020", "step_00000030", "step_00000040.partial"]


def test_saves_with_retention_leave_k_loadable_checkpoints(tmp_path: Path) -> None:
    model, optimizer = small_model_and_optimizer(0)
    for step in range(1, 6):
        state = TrainerState(step=step)
        save_checkpoint(tmp_path, model, optimizer, state, ENV, retention=Retention(keep=2))
    assert _names(tmp_path) == ["step_00000004", "step_00000005"]
    for path in tmp_path.iterdir():
        verify_checkpoint(path)
    assert find_checkpoint(tmp_path) == tmp_path / "step_00000005"
