"""A path unpickled from `.metadata` that shows one name and opens another is never followed.

The allow-list admits `pathlib.PosixPath` (DCP records the checkpoint's own path with one). A
pickle can build one from a path outside the checkpoint and then set its cached string to a
shard's name: a check that reads str() sees `__0_0.distcp`, DCP opening `root / path` gets the
outside file. Pointed at a FIFO the load blocked forever; at a shard of another checkpoint it
loaded those weights without a word.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from checkpoint.lies import SHARD, plant_lying_shard_paths
from helpers import small_model_and_optimizer
from shardwise.checkpoint import CheckpointRejected, TrainerState, load_checkpoint, save_checkpoint
from shardwise.checkpoint.metadata import read_metadata
from shardwise.distributed import DistEnv

pytestmark = pytest.mark.timeout(60)

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
HANG_S = 20


def saved(directory: Path, seed: int) -> Path:
    model, optimizer = small_model_and_optimizer(seed)
    return save_checkpoint(directory, model, optimizer, TrainerState(step=1), ENV)


def load_with_deadline(path: Path, fifo: Path | None = None) -> tuple[torch.nn.Module, object]:
    """Load `path` into a fresh model in a thread; (model, what it raised or None)."""
    model, optimizer = small_model_and_optimizer(2)
    outcome: list[object] = []

    def load() -> None:
        try:
            load_checkpoint(path, model, optimizer, ENV)
            outcome.append(None)
        except Exception as exc:  # the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive() and fifo is not None:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
        thread.join(HANG_S)
        pytest.fail(f"the load blocked on {fifo}, outside the checkpoint")
    assert not thread.is_alive()
    return model, outcome[0]


def test_a_lying_path_to_a_fifo_outside_is_refused_without_blocking(tmp_path: Path) -> None:
    checkpoint = saved(tmp_path / "checkpoints", seed=0)
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)
    plant_lying_shard_paths(checkpoint, fifo)
    _, raised = load_with_deadline(checkpoint, fifo)
    assert isinstance(raised, CheckpointRejected), raised
    assert "\n" not in str(raised)


def test_a_lying_path_to_another_checkpoints_shard_does_not_load_it(tmp_path: Path) -> None:
    checkpoint = saved(tmp_path / "checkpoints", seed=0)
    other = saved(tmp_path / "elsewhere", seed=1)
    plant_lying_shard_paths(checkpoint, other / SHARD)
    model, raised = load_with_deadline(checkpoint)
    assert isinstance(raised, CheckpointRejected), raised
    outside = small_model_and_optimizer(1)[0].state_dict()
    for name, tensor in model.state_dict().items():
        assert not tensor.equal(outside[name]), f"{name} was loaded from {other / SHARD}"


def test_the_metadata_handed_on_holds_plain_strings_only(tmp_path: Path) -> None:
    checkpoint = saved(tmp_path / "checkpoints", seed=0)
    for info in read_metadata(checkpoint).storage_data.values():
        assert type(info.relative_path) is str
    plant_lying_shard_paths(checkpoint, tmp_path / "anywhere")
    with pytest.raises(CheckpointRejected, match=r"\.metadata"):
        read_metadata(checkpoint)
