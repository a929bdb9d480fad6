"""Checkpoints that lie: each function plants one lie in a sealed checkpoint, then reseals it.

    tampered = plant_far_step(run_dir / "checkpoints" / "step_00000003")
    # resuming from `tampered` must refuse it; from the run dir, skip it for an older one

Unlike payloads.py these run no code: they make the loader believe something false (a file
name that is another file, a step the run never reached, weights of another dtype) or trip it
over data it did not expect. Every one reseals the manifest as an attacker would, and returns
the checkpoint it tampered with (a lie about the step needs a directory named for it).
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.filesystem import _StorageInfo

from checkpoint.payloads import METADATA, RNG, STATE, _append_to_shard, _read_metadata, seal
from shardwise.train.lr_schedule import lr_factor

SHARD = "__0_0.distcp"


class LyingPath:
    """Pickles as a PosixPath whose str() is `shown` but which joins as `real`.

    str() returns a path's cached `_str`; joining (`root / path`, as DCP opens shards) reads the
    parts it was built from. BUILD sets the cache after construction, so the two disagree.
    """

    def __init__(self, shown: str, real: str) -> None:
        self.shown, self.real = shown, real

    def __reduce__(self) -> tuple:
        return (pathlib.PosixPath, (self.real,), (None, {"_str": self.shown}))


def plant_lying_shard_paths(checkpoint_dir: Path, real: Path) -> Path:
    """Every storage record's file named `__0_0.distcp` to a check, opened at `real` by DCP."""
    metadata = _read_metadata(checkpoint_dir)
    for index, info in metadata.storage_data.items():
        lie = LyingPath(info.relative_path, str(real))
        metadata.storage_data[index] = _StorageInfo(lie, info.offset, info.length)  # type: ignore[arg-type]
    (checkpoint_dir / METADATA).write_bytes(pickle.dumps(metadata))
    seal(checkpoint_dir)
    return checkpoint_dir


def plant_unknown_layout(checkpoint_dir: Path) -> Path:
    """A tensor layout name torch does not know: `_get_layout` raises KeyError while unpickling."""
    raw = (checkpoint_dir / METADATA).read_bytes()
    assert b"torch.strided" in raw
    (checkpoint_dir / METADATA).write_bytes(raw.replace(b"torch.strided", b"torch.bogus!!"))
    seal(checkpoint_dir)
    return checkpoint_dir


def plant_invalid_rng_state(checkpoint_dir: Path) -> Path:
    """A CPU RNG state of the right dtype and size that torch refuses: Invalid mt19937 state."""
    save_file({"cpu": torch.full_like(torch.get_rng_state(), 255)}, str(checkpoint_dir / RNG))
    seal(checkpoint_dir)
    return checkpoint_dir


def plant_empty_model_fingerprint(checkpoint_dir: Path) -> Path:
    """The schema's default: a state without one skipped the check that the model matches."""
    return _edit_state(checkpoint_dir, model_fingerprint="")


def plant_empty_data_fingerprint(checkpoint_dir: Path) -> Path:
    """The schema's default: a state without one skipped the check that the data matches."""
    return _edit_state(checkpoint_dir, data_fingerprint="")


def plant_far_step(checkpoint_dir: Path) -> Path:
    """Step 99,999,999 with a scheduler and rates that agree with it, in a directory named so."""
    step = 99_999_999
    state = json.loads((checkpoint_dir / STATE).read_text(encoding="utf-8"))
    config = state["config"]
    rate = config["lr"] * lr_factor(
        step, config["warmup_steps"], config["max_steps"], config["min_lr_ratio"]
    )
    state["step"] = step
    state["scheduler"].update(last_epoch=step, _step_count=step + 1, _last_lr=[rate])
    for group in state["optimizer_groups"]:
        group["lr"] = rate
    far = checkpoint_dir.with_name(f"step_{step:08d}")
    shutil.copytree(checkpoint_dir, far)
    (far / STATE).write_text(json.dumps(state), encoding="utf-8")
    seal(far)
    return far


def plant_far_epoch(checkpoint_dir: Path) -> Path:
    """An epoch of 2**64: no run of a few steps gets there."""
    state = json.loads((checkpoint_dir / STATE).read_text(encoding="utf-8"))
    return _edit_state(checkpoint_dir, position={**state["position"], "epoch": 2**64})


def plant_far_tokens(checkpoint_dir: Path) -> Path:
    """10**30 tokens trained (an integer: the schema's strict int refuses the float 1e30)."""
    return _edit_state(checkpoint_dir, tokens=10**30)


def plant_int64_weights(checkpoint_dir: Path) -> Path:
    """One float weight stored, and described in .metadata, as int64: DCP casts it silently."""
    return _int64_weight(checkpoint_dir, describe=True)


def plant_int64_shard_only(checkpoint_dir: Path) -> Path:
    """One float weight stored as int64 while .metadata still says float32."""
    return _int64_weight(checkpoint_dir, describe=False)


def _int64_weight(checkpoint_dir: Path, describe: bool) -> Path:
    metadata = _read_metadata(checkpoint_dir)
    key = next(key for key in metadata.state_dict_metadata if key.startswith("model."))
    item = metadata.state_dict_metadata[key]
    (index,) = [index for index in metadata.storage_data if index.fqn == key]
    weights = torch.full(tuple(item.size), 7, dtype=torch.int64)
    payload = _saved(weights)
    metadata.storage_data[index] = _append_to_shard(checkpoint_dir, payload)
    if describe:
        item.properties.dtype = torch.int64
    (checkpoint_dir / METADATA).write_bytes(pickle.dumps(metadata))
    seal(checkpoint_dir)
    return checkpoint_dir


def _saved(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def _edit_state(checkpoint_dir: Path, **changes: object) -> Path:
    state = json.loads((checkpoint_dir / STATE).read_text(encoding="utf-8"))
    state.update(changes)
    (checkpoint_dir / STATE).write_text(json.dumps(state), encoding="utf-8")
    seal(checkpoint_dir)
    return checkpoint_dir
