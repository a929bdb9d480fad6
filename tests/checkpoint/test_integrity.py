"""Corrupted, truncated, incomplete or edited checkpoints are refused, or skipped on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import reseal, small_model_and_optimizer
from shardwise.checkpoint import (
    CheckpointRejected,
    TrainerState,
    choose_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from shardwise.checkpoint.manifest import MANIFEST_FILE
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
SHARD = "__0_0.distcp"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory with checkpoints at steps 1 and 2."""
    model, optimizer = small_model_and_optimizer(0)
    for step in (1, 2):
        save_checkpoint(tmp_path / "checkpoints", model, optimizer, TrainerState(step=step), ENV)
    return tmp_path


def newest(run: Path) -> Path:
    return run / "checkpoints" / "step_00000002"


def edit_state(path: Path, **changes: object) -> None:
    state = json.loads((path / "trainer_state.json").read_text())
    state.update(changes)
    (path / "trainer_state.json").write_text(json.dumps(state))


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_refused(path: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointRejected) as caught:
        verify_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_fresh_checkpoint_verifies_and_loads(run: Path) -> None:
    assert verify_checkpoint(newest(run)).step == 2
    assert choose_checkpoint(run) == (newest(run), verify_checkpoint(newest(run)), [])


def test_a_flipped_byte_in_a_shard_is_refused_naming_the_file(run: Path) -> None:
    flip_byte(newest(run) / SHARD)
    assert_refused(newest(run), SHARD, "does not match its digest")
    with pytest.raises(ShardwiseError, match=SHARD):
        load_checkpoint(newest(run), *small_model_and_optimizer(1), ENV)


def test_a_resume_from_the_run_dir_falls_back_to_the_previous_verified_checkpoint(
    run: Path,
) -> None:
    flip_byte(newest(run) / SHARD)
    path, state, notes = choose_checkpoint(run)
    assert path == run / "checkpoints" / "step_00000001"
    assert state.step == 1
    assert notes == [
        f"step_00000002 skipped: {SHARD} does not match its digest in manifest.json "
        "(corrupted or edited)"
    ]


def test_a_named_checkpoint_that_fails_is_refused_not_replaced(run: Path) -> None:
    flip_byte(newest(run) / SHARD)
    with pytest.raises(CheckpointRejected, match="does not match"):
        choose_checkpoint(newest(run))


def test_no_checkpoint_verifies_is_one_clear_error(run: Path) -> None:
    for step in (1, 2):
        (run / "checkpoints" / f"step_{step:08d}" / MANIFEST_FILE).unlink()
    with pytest.raises(ShardwiseError, match=r"no checkpoint there verifies \(step_00000001"):
        choose_checkpoint(run)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda p: (p / SHARD).write_bytes((p / SHARD).read_bytes()[:-10]), "bytes"),
        (lambda p: (p / SHARD).unlink(), f"{SHARD} is missing"),
        (lambda p: (p / "rng" / "rank0.safetensors").unlink(), "rank0.safetensors is missing"),
        (lambda p: (p / "stray.bin").write_bytes(b"x"), "stray.bin is not listed"),
        (lambda p: (p / MANIFEST_FILE).unlink(), "no manifest.json"),
        (lambda p: (p / MANIFEST_FILE).write_text("{not json"), "manifest.json is malformed"),
        (
            lambda p: (p / MANIFEST_FILE).write_text(
                (p / MANIFEST_FILE).read_text().replace('"sha256": "', '"sha256": "0', 1)
            ),
            "manifest.json is malformed",
        ),
    ],
    ids=[
        "truncated",
        "missing-shard",
        "missing-rng",
        "extra-file",
        "unsealed",
        "bad-json",
        "bad-digest",
    ],
)
def test_damaged_checkpoints_are_refused(run: Path, damage, fragment: str) -> None:
    damage(newest(run))
    assert_refused(newest(run), fragment)
    assert choose_checkpoint(run)[0].name == "step_00000001"


def test_a_manifest_that_does_not_match_is_refused(run: Path) -> None:
    manifest = json.loads((newest(run) / MANIFEST_FILE).read_text())
    manifest["files"][SHARD]["sha256"] = "0" * 64
    (newest(run) / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert_refused(newest(run), SHARD, "does not match its digest")


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"step": 15}, "its trainer state says step 15"),
        ({"step": 1000}, "its trainer state says step 1000"),
        ({"step": -5}, "step: Input should be greater than or equal to 0"),
        ({"step": "2"}, "step: Input should be a valid integer"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
        ({"position": {"epoch": 0, "offset": -3}}, "must not be negative"),
        ({"world_size": 0}, "world_size"),
    ],
)
def test_an_edited_trainer_state_is_refused_even_when_resealed(
    run: Path, changes: dict, fragment: str
) -> None:
    edit_state(newest(run), **changes)
    reseal(newest(run))
    assert_refused(newest(run), fragment)


def test_a_state_file_that_is_not_json_is_one_line(run: Path) -> None:
    (newest(run) / "trainer_state.json").write_text("{'step': 2,")
    reseal(newest(run))
    assert_refused(newest(run), "trainer_state.json is malformed")


def test_a_malformed_rng_state_is_refused_when_loading(run: Path) -> None:
    save_file(
        {"cpu": torch.zeros(7, dtype=torch.uint8)}, str(newest(run) / "rng/rank0.safetensors")
    )
    reseal(newest(run))
    with pytest.raises(CheckpointRejected, match="CPU RNG state of another size"):
        load_checkpoint(newest(run), *small_model_and_optimizer(1), ENV)
    (newest(run) / "rng/rank0.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    reseal(newest(run))
    with pytest.raises(CheckpointRejected, match=r"rank0\.safetensors"):
        load_checkpoint(newest(run), *small_model_and_optimizer(1), ENV)


def test_the_shards_hold_tensors_only_and_hyperparameters_round_trip(run: Path) -> None:
    path = newest(run)
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["optimizer_groups"][0]["betas"] == [0.9, 0.999]
    model, optimizer = small_model_and_optimizer(1)
    optimizer.param_groups[0]["betas"] = (0.5, 0.5)
    load_checkpoint(path, model, optimizer, ENV)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert optimizer.param_groups[0]["lr"] == 0.1
