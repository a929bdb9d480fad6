"""A symbolic link where a checkpoint belongs is never written through, followed or deleted into.

A run dir from elsewhere may hold links among its checkpoints: a pre-planted `step_N.partial`,
a step directory that is a link, a linked step that retention prunes. Each crashed the save
after training (the final checkpoint, model and summary lost). Now a save replaces the link
itself, removal unlinks it, a resume skips it in one line, and `check_no_links` refuses it in
one line before training starts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from checkpoint.trained_run import Base, copy_run, resume, step_dir, train_base
from helpers import small_model_and_optimizer
from shardwise.checkpoint import (
    Retention,
    TrainerState,
    check_no_links,
    choose_checkpoint,
    save_checkpoint,
)
from shardwise.checkpoint.verified import SYMLINK_REASON
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError

pytestmark = pytest.mark.timeout(120)

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
VICTIM = b"someone else's file\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the run dir, with one file in it that must stay as it is."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim.bin").write_bytes(VICTIM)
    return folder


def untouched(outside: Path) -> bool:
    return (
        sorted(p.name for p in outside.iterdir()) == ["victim.bin"]
        and (outside / "victim.bin").read_bytes() == VICTIM
    )


def save(directory: Path, step: int, keep: int = 0) -> Path:
    model, optimizer = small_model_and_optimizer(step)
    retention = Retention(keep=keep)
    return save_checkpoint(
        directory, model, optimizer, TrainerState(step=step), ENV, None, retention
    )


def is_real_checkpoint(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / "manifest.json").is_file()


def test_a_planted_partial_link_is_replaced_not_written_through(
    tmp_path: Path, outside: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "step_00000001.partial").symlink_to(outside)
    assert is_real_checkpoint(save(checkpoints, 1))
    assert not (checkpoints / "step_00000001.partial").is_symlink()
    assert untouched(outside)


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-folder", "dangling"])
def test_a_step_directory_link_is_replaced_not_written_through(
    tmp_path: Path, outside: Path, dangling: bool
) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "step_00000001").symlink_to(tmp_path / "nowhere" if dangling else outside)
    assert is_real_checkpoint(save(checkpoints, 1))
    assert untouched(outside)


def test_retention_unlinks_a_linked_step_and_keeps_what_it_points_to(
    tmp_path: Path, outside: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    elsewhere = save(tmp_path / "elsewhere", 1)  # a whole checkpoint, kept outside the run
    checkpoints.mkdir()
    (checkpoints / "step_00000001").symlink_to(elsewhere)
    save(checkpoints, 2, keep=1)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]
    assert is_real_checkpoint(elsewhere)


def test_a_linked_step_in_a_run_dir_is_skipped_in_one_line(tmp_path: Path) -> None:
    real = save(tmp_path / "elsewhere", 2)
    save(tmp_path / "checkpoints", 1)
    (tmp_path / "checkpoints" / "step_00000002").symlink_to(real)
    path, state, notes = choose_checkpoint(tmp_path)
    assert (path.name, state.step) == ("step_00000001", 1)
    assert notes == [f"step_00000002 skipped: {SYMLINK_REASON}"]


@pytest.mark.parametrize("name", ["step_00000002", "step_00000002.partial", "step_00000002.old"])
def test_check_no_links_refuses_a_link_where_a_checkpoint_belongs(
    tmp_path: Path, outside: Path, name: str
) -> None:
    save(tmp_path / "checkpoints", 1)
    (tmp_path / "checkpoints" / name).symlink_to(outside)
    with pytest.raises(ShardwiseError) as refused:
        check_no_links(tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    assert str(tmp_path / "checkpoints" / name) in message


def test_check_no_links_lets_real_checkpoints_and_a_linked_checkpoints_folder_be(
    tmp_path: Path,
) -> None:
    check_no_links(tmp_path)  # no run yet
    save(tmp_path / "elsewhere" / "checkpoints", 1)
    (tmp_path / "checkpoints").symlink_to(tmp_path / "elsewhere" / "checkpoints")
    check_no_links(tmp_path)  # the whole folder on another disk is the user's choice
    (tmp_path / "checkpoints" / "notes.txt").symlink_to(tmp_path / "elsewhere")
    check_no_links(tmp_path)  # not a name shardwise writes


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return train_base(tmp_path_factory.mktemp("base"))


def test_a_resume_whose_final_save_meets_a_planted_link_keeps_its_checkpoint(
    base: Base, tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = copy_run(base, tmp_path / "copy")
    shutil.rmtree(step_dir(run, 3))
    step_dir(run, 3).symlink_to(outside)  # where the final save goes
    (run / "checkpoints" / "step_00000003.partial").symlink_to(outside)
    # Planted before the run: refused in one line before training, nothing written.
    with pytest.raises(ShardwiseError, match="is a symbolic link where shardwise writes"):
        resume(base, run, resume_from=step_dir(run, 2))
    assert untouched(outside) and step_dir(run, 3).is_symlink()
    # Planted after that check (here: the check skipped): the saves still never write through.
    monkeypatch.setattr("shardwise.run_dir.check_no_links", lambda run_dir: None)
    summary = resume(base, run, resume_from=step_dir(run, 2))
    assert summary["steps"] == 3
    assert is_real_checkpoint(step_dir(run, 3))
    assert (run / "model.safetensors").is_file() and (run / "summary.json").is_file()
    assert untouched(outside)
