"""What is loaded is what was checked: a shard swapped after it was hashed is never used.

The attack is time-of-check to time-of-use: verification hashes every file, then the loader
opens them again. Whoever can write the run directory swaps a shard in between (here: for the
same tensors from another checkpoint, so nothing but the digest can tell).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import shardwise.checkpoint.find
from checkpoint.trained_run import (
    Base,
    assert_ends_exactly,
    copy_run,
    resume,
    step_dir,
    train_base,
)
from helpers import small_model_and_optimizer
from shardwise.checkpoint import (
    CheckpointRejected,
    TrainerState,
    choose_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from shardwise.distributed import DistEnv

pytestmark = pytest.mark.timeout(180)

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
SHARD = "__0_0.distcp"


def test_a_shard_swapped_after_verification_is_refused_by_the_load(tmp_path: Path) -> None:
    # Two models of one shape: their shards are alike but for the values.
    for step, seed in ((1, 0), (2, 1)):
        model, optimizer = small_model_and_optimizer(seed)
        save_checkpoint(tmp_path / "checkpoints", model, optimizer, TrainerState(step=step), ENV)
    older, newer = (
        tmp_path / "checkpoints" / "step_00000001",
        tmp_path / "checkpoints" / "step_00000002",
    )
    path, _, _ = choose_checkpoint(tmp_path)
    assert path == newer
    (newer / SHARD).write_bytes((older / SHARD).read_bytes())  # after the check, before the use

    model, optimizer = small_model_and_optimizer(2)
    with pytest.raises(CheckpointRejected, match=f"{SHARD} does not match its digest"):
        load_checkpoint(newer, model, optimizer, ENV, verify=False)
    older_weights = small_model_and_optimizer(0)[0].state_dict()
    for name, tensor in model.state_dict().items():
        assert not tensor.equal(older_weights[name]), f"{name} holds the swapped-in values"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return train_base(tmp_path_factory.mktemp("base"))


def test_a_resume_skips_a_checkpoint_whose_shard_is_swapped_once_verified(
    base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = copy_run(base, tmp_path)
    verify = shardwise.checkpoint.find.verify_checkpoint

    def verify_then_swap(path: Path) -> TrainerState:
        state = verify(path)
        if path.name == "step_00000003":  # the moment between rank 0's check and every load
            shutil.copyfile(step_dir(run, 2) / SHARD, path / SHARD)
        return state

    monkeypatch.setattr(shardwise.checkpoint.find, "verify_checkpoint", verify_then_swap)
    summary = resume(base, run)
    assert summary["resumed_from"] == str(step_dir(run, 2))
    assert summary["resume_notes"][0] == (
        f"step_00000003 skipped: {SHARD} does not match its digest in manifest.json "
        "(corrupted or edited)"
    )
    assert_ends_exactly(base, run)
