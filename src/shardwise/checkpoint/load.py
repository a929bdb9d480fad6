"""Load a verified checkpoint into a live model and optimizer, on any number of ranks.

    state = load_checkpoint(path, model, optimizer, env)      # verifies the files first
    model = load_model_weights(path, build_model("lstm"))     # the whole model, one process

Nothing here unpickles: the metadata goes through the allow-list reader, shards yield tensors
only, the trainer state is schema-checked JSON and RNG states are safetensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from shardwise.checkpoint.errors import CheckpointRejected
from shardwise.checkpoint.manifest import check_regular_file, verify_manifest
from shardwise.checkpoint.metadata import SafeFileSystemReader, read_metadata
from shardwise.checkpoint.save import (
    SyncState,
    checkpoint_name,
    replica_key,
    rng_file,
    split_optimizer_state,
)
from shardwise.checkpoint.state import TrainerState, read_state
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError, first_line

# What a mismatched model or optimizer makes DCP raise while loading.
_MISFIT = (CheckpointException, RuntimeError, KeyError, ValueError, AssertionError)


def verify_checkpoint(path: Path) -> TrainerState:
    """Every file against the manifest, then the state's schema and the metadata's allow-list."""
    verify_manifest(path)
    state = read_state(path)
    if path.name.split(".")[0] != checkpoint_name(state.step):
        raise CheckpointRejected(path, f"its trainer state says step {state.step}")
    read_metadata(path)
    return state


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    env: DistEnv,
    verify: bool = True,
    sync: SyncState | None = None,
) -> TrainerState:
    """Restore model, optimizer and this rank's RNG from `path`; returns the trainer state.

    `verify=False` when another rank already verified the same files moments ago. `sync`'s
    tensors are filled in place; with `sync.replica` set, the model and optimizer come from
    that replica's own copy (see `SyncState`).
    """
    state = verify_checkpoint(path) if verify else read_state(path)
    # Through the allow-list before any shard is opened, whoever verified the files.
    metadata = read_metadata(path)
    tensors, _ = split_optimizer_state(model, optimizer)
    sync = sync or SyncState()
    wanted: dict = dict(tensors)
    if sync.replica is not None:
        _require_replica(path, metadata.state_dict_metadata, sync.replica)
        wanted = {"replica": {replica_key(sync.replica): tensors}}
    if sync.tensors:
        _require_sync(path, metadata.state_dict_metadata, sync.tensors)
        wanted["sync"] = sync.tensors
    try:
        _dcp_load(wanted, path)
    except _MISFIT as exc:
        raise ShardwiseError(
            f"--resume {path}: does not fit this model and optimizer ({_root_cause(exc)})"
        ) from None
    groups = _merge_groups(path, optimizer_groups(model, optimizer), state.optimizer_groups)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=tensors["model"],
        optim_state_dict={"state": tensors["optim"]["state"], "param_groups": groups},
    )
    _load_rng(path, env.rank, required=env.rank < state.world_size)
    return state


def load_model_weights(path: Path, model: nn.Module) -> nn.Module:
    """Fill a whole, unsharded `model` from checkpoint `path` in this process alone.

        model = load_model_weights(run_dir / "checkpoints" / "step_00000300", build_model("lstm"))

    DCP reassembles pipeline stages and tensor-parallel shards, whatever layout saved them.
    """
    verify_checkpoint(path)
    state = {"model": model.state_dict()}
    _dcp_load(state, path, no_dist=True)
    model.load_state_dict(state["model"])
    return model


def _require_replica(path: Path, keys: Iterable[str], dp_rank: int) -> None:
    prefix = f"replica.{replica_key(dp_rank)}."
    if not any(key.startswith(prefix) for key in keys):
        raise ShardwiseError(
            f"--resume {path}: it keeps no own weights for data-parallel replica {dp_rank}; "
            "--sync local-sgd and diloco resume exactly only with the --sync and data-parallel "
            "degree that saved them: resume with those"
        )


def _require_sync(path: Path, keys: Iterable[str], tensors: dict[str, torch.Tensor]) -> None:
    # Keys that name a replica (PowerSGD's error feedback) go missing under another degree.
    missing = sorted(set(f"sync.{key}" for key in tensors) - set(keys))
    if missing:
        raise ShardwiseError(
            f"--resume {path}: it holds no {missing[0]} for this run's synchronisation; resume "
            "with the --sync and --grad-compression settings and data-parallel degree that saved it"
        )


def optimizer_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The live optimizer's parameter groups, parameters named as in the model."""
    return get_state_dict(model, optimizer)[1]["param_groups"]


def _dcp_load(state: dict, path: Path, no_dist: bool = False) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(
            state, checkpoint_id=path, storage_reader=SafeFileSystemReader(path), no_dist=no_dist
        )


def _merge_groups(path: Path, live: list[dict], saved: list[dict]) -> list[dict]:
    """This rank's groups (its own parameter names) with the saved hyperparameters."""
    if len(live) != len(saved):
        raise ShardwiseError(
            f"--resume {path}: the optimizer has {len(live)} parameter group(s), "
            f"the checkpoint {len(saved)}"
        )
    merged = []
    for group, values in zip(live, saved, strict=True):
        if set(values) != set(group) - {"params"}:
            raise ShardwiseError(
                f"--resume {path}: the optimizer's settings {sorted(set(group) - {'params'})} "
                f"differ from the checkpoint's {sorted(values)}; was it another optimizer?"
            )
        restored = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        merged.append({**restored, "params": group["params"]})
    return merged


def _load_rng(path: Path, rank: int, required: bool) -> None:
    file = path / rng_file(rank)
    if not file.exists() and not file.is_symlink():
        # A rank that did not exist at save time keeps its seeded state.
        if required:
            raise CheckpointRejected(path, f"{rng_file(rank)} is missing")
        return
    check_regular_file(path, rng_file(rank))
    try:
        states = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointRejected(
            path, f"{rng_file(rank)} is not a safetensors file ({exc})"
        ) from None
    cpu = states.get("cpu")
    expected = torch.get_rng_state()
    if set(states) - {"cpu", "cuda"} or cpu is None or cpu.dtype != expected.dtype:
        raise CheckpointRejected(path, f"{rng_file(rank)} does not hold RNG states")
    if cpu.shape != expected.shape:
        raise CheckpointRejected(path, f"{rng_file(rank)} holds a CPU RNG state of another size")
    torch.set_rng_state(cpu)
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _root_cause(exc: BaseException) -> str:
    # DCP wraps each rank's error, with its traceback, in a CheckpointException: the first
    # rank's own exception is the one that says what did not fit.
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    return first_line(exc, with_type=True)
