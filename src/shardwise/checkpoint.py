"""Sharded, atomic, reshardable checkpoints with torch.distributed.checkpoint (DCP).

    path = save_checkpoint(run_dir / "checkpoints", model, optimizer, state, env)
    state = load_checkpoint(path, model, optimizer, env)   # on any number of ranks

A checkpoint is a directory `step_00000100/` holding DCP shards (model and optimizer, keyed by
parameter name, so a different world size loads them), `trainer_state.json` (step, data position,
scheduler and loss-scaler state) and one `rng/rank<r>.safetensors` per rank. Every rank writes into
`step_00000100.partial/`, and rank 0 renames it only after all ranks are done: a run killed while
saving leaves a `.partial` directory that is never taken for a checkpoint. Loading reads JSON,
safetensors and DCP's metadata through an unpickler that admits only DCP's own record types, so
no checkpoint can run code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from shardwise.data.sampler import SamplerPosition
from shardwise.distributed import DistEnv, barrier, broadcast_object
from shardwise.errors import ShardwiseError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d{8})$")


@dataclass
class TrainerState:
    """The non-tensor part of a checkpoint; JSON on disk."""

    step: int = 0
    position: SamplerPosition = field(default_factory=SamplerPosition)
    tokens: int = 0
    scheduler: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    world_size: int = 1
    stream: dict = field(default_factory=dict)  # what fixes the data order (batching, seed)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        raw = json.loads(text)
        raw["position"] = SamplerPosition(**raw["position"])
        return cls(**raw)


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    env: DistEnv,
) -> Path:
    """Write a checkpoint for `state.step` under `directory`; returns its final path."""
    final = directory / f"step_{state.step:08d}"
    partial = final.with_name(final.name + ".partial")
    if env.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed mid-save
        partial.mkdir(parents=True)
    barrier(env)
    model_state, optim_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        # A single process has no group; DCP warns that it will save alone, as intended.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial)
    _save_rng(partial / "rng" / f"rank{env.rank}.safetensors")
    barrier(env)
    if env.is_main:
        _write_durably(partial / STATE_FILE, state.to_json())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    barrier(env)
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv
) -> TrainerState:
    """Restore model, optimizer and this rank's RNG from `path`; returns the trainer state."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise ShardwiseError(f"--resume {path}: not a complete shardwise checkpoint")
    check_metadata(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    bundle = {"model": model_state, "optim": optim_state}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(bundle, checkpoint_id=path, storage_reader=SafeFileSystemReader(path))
    except (CheckpointException, RuntimeError, KeyError, ValueError, AssertionError) as exc:
        raise ShardwiseError(
            f"--resume {path}: does not fit this model and optimizer ({_root_cause(exc)})"
        ) from None
    set_state_dict(
        model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optim"]
    )
    _load_rng(path / "rng" / f"rank{env.rank}.safetensors")
    return TrainerState.from_json(state_file.read_text(encoding="utf-8"))


def load_model_weights(path: Path, model: nn.Module) -> nn.Module:
    """Fill a whole, unsharded `model` from checkpoint `path` in this process alone.

        model = load_model_weights(run_dir / "checkpoints" / "step_00000300", build_model("lstm"))

    DCP reassembles pipeline stages and tensor-parallel shards, whatever layout saved them.
    """
    check_metadata(path)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, storage_reader=SafeFileSystemReader(path), no_dist=True)
    model.load_state_dict(state["model"])
    return model


def find_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the latest complete one in a run directory."""
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
    if found is None:
        raise ShardwiseError(
            f"--resume {path}: no complete checkpoint there; pass a run directory or a "
            "checkpoints/step_XXXXXXXX directory"
        )
    return found


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step in `directory`, if any."""
    if not directory.is_dir():
        return None
    complete = [
        child
        for child in directory.iterdir()
        if _NAME.match(child.name) and (child / STATE_FILE).is_file()
    ]
    return max(complete, key=lambda child: child.name, default=None)


def agree_on_checkpoint(path: Path | None, env: DistEnv) -> Path | None:
    """Rank 0's choice of checkpoint, so that every rank loads the same one."""
    chosen = broadcast_object(str(path) if path else None, env)
    return Path(chosen) if chosen else None


def check_metadata(path: Path) -> None:
    """Read DCP's metadata with the restricted unpickler; refuse the checkpoint if it objects."""
    try:
        SafeFileSystemReader(path).read_metadata()
    except (pickle.UnpicklingError, OSError, EOFError) as exc:
        raise ShardwiseError(f"--resume {path}: refused to load ({exc})") from None


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata unpickling admits only DCP's plain record types."""

    def read_metadata(self, *args: object, **kwargs: object) -> Metadata:
        # Mirrors FileSystemReader.read_metadata, which calls plain pickle.load.
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError("checkpoint metadata is not a DCP Metadata record")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        found = super().find_class(module, name)
        if _allowed_in_metadata(module, name, found):
            return found
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, not allowed")


# Plain values DCP's metadata refers to by name; none of them can run code when called.
_ALLOWED_NAMES = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "Path"),
}


def _allowed_in_metadata(module: str, name: str, found: object) -> bool:
    if isinstance(found, torch.dtype | torch.layout | torch.memory_format):
        return True
    if (module, name) in _ALLOWED_NAMES:
        return True
    # DCP's own dataclasses and enums: constructing them runs no user code.
    return module.startswith("torch.distributed.checkpoint") and isinstance(found, type)


def _save_rng(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    save_file(states, str(path))


def _load_rng(path: Path) -> None:
    # A rank that did not exist when the checkpoint was written keeps its seeded state.
    if not path.is_file():
        return
    states = load_file(str(path))
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _root_cause(exc: BaseException) -> str:
    # DCP wraps each rank's error in a CheckpointException whose text ends with the real one.
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
