"""Load a verified checkpoint into a live model and optimizer, on any number of ranks.

    state = load_checkpoint(path, model, optimizer, env)      # verifies the files first
    model = load_model_weights(path, build_model("lstm"))     # the whole model, one process

Nothing here unpickles: the metadata goes through the allow-list reader, shards yield tensors
only, the trainer state is schema-checked JSON and RNG states are safetensors. Every file is
read once and checked against the manifest as it is read (`verified.py`): what is loaded is
what was checked, whoever checked the checkpoint before and however long ago.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load as load_safetensors
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from shardwise.checkpoint.agreement import Ranks, attempt
from shardwise.checkpoint.errors import CheckpointRejected
from shardwise.checkpoint.metadata import METADATA_FILE, parse_metadata
from shardwise.checkpoint.reader import VerifiedReader
from shardwise.checkpoint.save import (
    SyncState,
    checkpoint_name,
    replica_key,
    rng_file,
    split_optimizer_state,
)
from shardwise.checkpoint.state import TrainerState, state_of
from shardwise.checkpoint.verified import VerifiedFiles
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError, first_line

# What a mismatched model or optimizer makes DCP raise while loading.
_MISFIT = (CheckpointException, RuntimeError, KeyError, ValueError, AssertionError)


def verify_checkpoint(path: Path) -> TrainerState:
    """Every file against the manifest, then the state's schema and the metadata's allow-list."""
    with VerifiedFiles(path) as files:
        return _read_checked(files, verify=True)[0]


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    env: DistEnv,
    verify: bool = True,
    sync: SyncState | None = None,
) -> TrainerState:
    """Restore model, optimizer and this rank's RNG from `path`; returns the trainer state.

    `verify=False` when another rank already verified the same files moments ago: each file
    this rank reads is still checked against the manifest as it is read. `sync`'s tensors are
    filled in place; with `sync.replica` set, the model and optimizer come from that replica's
    own copy (see `SyncState`). Any rank's failure raises on every rank.
    """
    ranks = Ranks(env)
    sync = sync or SyncState()
    tensors, _ = split_optimizer_state(model, optimizer)
    with ExitStack() as stack:

        def prepare() -> tuple[VerifiedFiles, TrainerState, Metadata, dict]:
            files = stack.enter_context(VerifiedFiles(path))
            state, metadata = _read_checked(files, verify)
            return files, state, metadata, _wanted(path, metadata, tensors, sync)

        # Agreed before DCP's collectives: a rank that gave up alone would leave them waiting.
        prepared, failure, error = attempt(prepare, env.rank)
        ranks.settle(failure, error, path)
        assert prepared is not None
        files, state, metadata, wanted = prepared
        _dcp_load(wanted, files, metadata)  # DCP agrees on its own errors

        def restore() -> None:
            groups = _merge_groups(path, optimizer_groups(model, optimizer), state.optimizer_groups)
            optim_state = {"state": tensors["optim"]["state"], "param_groups": groups}
            set_state_dict(
                model, optimizer, model_state_dict=tensors["model"], optim_state_dict=optim_state
            )
            _load_rng(files, env.rank, required=env.rank < state.world_size)

        ranks.settle(*attempt(restore, env.rank)[1:], path)
    return state


def load_model_weights(path: Path, model: nn.Module) -> nn.Module:
    """Fill a whole, unsharded `model` from checkpoint `path` in this process alone.

        model = load_model_weights(run_dir / "checkpoints" / "step_00000300", build_model("lstm"))

    DCP reassembles pipeline stages and tensor-parallel shards, whatever layout saved them.
    """
    with VerifiedFiles(path) as files:
        _, metadata = _read_checked(files, verify=True)
        state = {"model": model.state_dict()}
        _dcp_load(state, files, metadata, no_dist=True)
    model.load_state_dict(state["model"])
    return model


def _read_checked(files: VerifiedFiles, verify: bool) -> tuple[TrainerState, Metadata]:
    """The state and the metadata (`verify`: every file first, and the state's step)."""
    path = files.root
    if verify:
        files.verify_all()
    state = state_of(files)
    if verify and path.name.split(".")[0] != checkpoint_name(state.step):
        raise CheckpointRejected(path, f"its trainer state says step {state.step}")
    metadata = parse_metadata(path, files.read(METADATA_FILE))
    for info in metadata.storage_data.values():
        if info.relative_path not in files.manifest.files:
            raise CheckpointRejected(
                path, f"{METADATA_FILE} names {info.relative_path!r}, which is not one of its files"
            )
    return state, metadata


def _wanted(path: Path, metadata: Metadata, tensors: dict, sync: SyncState) -> dict:
    """What DCP fills: model and optimizer (a replica's own, where kept), the strategy's state."""
    wanted: dict = dict(tensors)
    if sync.replica is not None:
        _require_replica(path, metadata.state_dict_metadata, sync.replica)
        wanted = {"replica": {replica_key(sync.replica): tensors}}
    if sync.tensors:
        _require_sync(path, metadata.state_dict_metadata, sync.tensors)
        wanted["sync"] = sync.tensors
    return wanted


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


def _dcp_load(state: dict, files: VerifiedFiles, metadata: Metadata, no_dist: bool = False) -> None:
    path = files.root
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            reader = VerifiedReader(files, metadata)
            dcp.load(state, checkpoint_id=path, storage_reader=reader, no_dist=no_dist)
        except _MISFIT as exc:
            cause = _root_cause(exc)
            if isinstance(cause, CheckpointRejected):  # on whichever rank read the bad bytes
                raise CheckpointRejected(path, cause.reason) from None
            raise ShardwiseError(
                f"--resume {path}: does not fit this model and optimizer "
                f"({first_line(cause, with_type=True)})"
            ) from None


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


def _load_rng(files: VerifiedFiles, rank: int, required: bool) -> None:
    path, name = files.root, rng_file(rank)
    if name not in files.manifest.files:
        # A rank that did not exist at save time keeps its seeded state.
        if required:
            raise CheckpointRejected(path, f"{name} is missing")
        return
    try:
        states = load_safetensors(files.read(name))
    except CheckpointRejected:
        raise
    except Exception as exc:  # the safetensors parser's, about these bytes
        raise CheckpointRejected(
            path, f"{name} is not a safetensors file ({first_line(exc)})"
        ) from None
    cpu = states.get("cpu")
    expected = torch.get_rng_state()
    if set(states) - {"cpu", "cuda"} or cpu is None or cpu.dtype != expected.dtype:
        raise CheckpointRejected(path, f"{name} does not hold RNG states")
    if cpu.shape != expected.shape:
        raise CheckpointRejected(path, f"{name} holds a CPU RNG state of another size")
    try:
        torch.set_rng_state(cpu)
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])
    except RuntimeError as exc:  # "Invalid mt19937 state": torch checks what it is given
        raise CheckpointRejected(
            path, f"{name} holds an invalid RNG state ({first_line(exc)})"
        ) from None


def _root_cause(exc: BaseException) -> BaseException:
    # DCP wraps each rank's error, with its traceback, in a CheckpointException: a refusal of
    # the files on any rank comes first, else the first rank's own exception says what did
    # not fit.
    if not isinstance(exc, CheckpointException) or not exc.failures:
        return exc
    causes = [cause for cause, _ in exc.failures.values()]
    return next((c for c in causes if isinstance(c, CheckpointRejected)), causes[0])
