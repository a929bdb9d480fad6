"""Write a checkpoint that is either whole and verified or not there at all.

    path = save_checkpoint(run_dir / "checkpoints", model, optimizer, state, env)

Every rank writes into `step_XXXXXXXX.partial/`: DCP shards with tensors only (the optimizer's
hyperparameters go to the JSON state), and its RNG state as safetensors. Each rank hashes what
it wrote; rank 0 writes the trainer state and, last, the manifest of every file's digest, then
swaps the directory in under its final name. A step saved again replaces the old checkpoint in
one rename, so a kill at any instant leaves the old or the new one whole.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from shardwise.checkpoint.files import replace_directory, write_durably
from shardwise.checkpoint.manifest import FileDigest, digest_files, write_manifest
from shardwise.checkpoint.state import STATE_FILE, TrainerState
from shardwise.distributed import DistEnv, barrier

PARTIAL_SUFFIX = ".partial"


@dataclass
class SyncState:
    """What the sync strategy adds to a checkpoint (tensors only).

    `tensors` is the strategy's own state (`strategy.state_dict()`: a local-SGD step counter,
    DiLoCo's anchor and outer momentum), saved under "sync". `replica` is this rank's
    data-parallel index where replicas' weights and optimizer states differ (local SGD between
    meetings): each replica's own copy is then saved under "replica.dp<i>" as well, since the
    shared "model" entry holds one replica's only. None: the replicas agree.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    replica: int | None = None


def checkpoint_name(step: int) -> str:
    """`step_00000100` for step 100."""
    return f"step_{step:08d}"


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    env: DistEnv,
    sync: SyncState | None = None,
) -> Path:
    """Write a checkpoint for `state.step` under `directory`; returns its final path."""
    final = directory / checkpoint_name(state.step)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if env.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed mid-save
        partial.mkdir(parents=True)
    barrier(env)
    tensors, state.optimizer_groups = split_optimizer_state(model, optimizer)
    sync = sync or SyncState()
    if sync.replica is not None:  # the same tensors twice: DCP keeps one replica's "model"
        tensors["replica"] = {replica_key(sync.replica): dict(tensors)}
    if sync.tensors:
        tensors["sync"] = dict(sync.tensors)
    with warnings.catch_warnings():
        # A single process has no group; DCP warns that it will save alone, as intended.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, checkpoint_id=partial)
    written = [*_shards_of(partial, env.rank), rng_file(env.rank)]
    _save_rng(partial / rng_file(env.rank))
    digests = _gather(digest_files(partial, written), env)
    if env.is_main:
        write_durably(partial / STATE_FILE, state.to_json())
        digests |= digest_files(partial, [STATE_FILE, ".metadata"])
        write_manifest(partial, digests)
        replace_directory(partial, final)
    barrier(env)
    return final


def split_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict, list[dict]]:
    """The tensors to shard (model and optimizer state), and the optimizer's hyperparameters."""
    model_state, optim_state = get_state_dict(model, optimizer)
    for name, values in optim_state["state"].items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):  # our shards hold tensors only
                raise TypeError(f"optimizer state {name}.{key} is not a tensor: {value!r}")
    groups = [
        {key: list(value) if isinstance(value, tuple) else value for key, value in group.items()}
        for group in optim_state["param_groups"]
    ]
    for group in groups:
        group.pop("params")  # this rank's parameter names: rebuilt from the live optimizer
    return {"model": model_state, "optim": {"state": optim_state["state"]}}, groups


def replica_key(dp_rank: int) -> str:
    """Where replica `dp_rank`'s own model and optimizer state live (under "replica")."""
    return f"dp{dp_rank}"


def rng_file(rank: int) -> str:
    """Where rank `rank`'s RNG state lives inside a checkpoint."""
    return f"rng/rank{rank}.safetensors"


def _shards_of(partial: Path, rank: int) -> list[str]:
    # DCP's FileSystemWriter names a rank's shard files __<rank>_<n>.distcp.
    return sorted(path.name for path in partial.glob(f"__{rank}_*.distcp"))


def _save_rng(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    save_file(states, str(path))


def _gather(digests: dict[str, FileDigest], env: DistEnv) -> dict[str, FileDigest]:
    """Every rank's digests, merged, on rank 0 (a few short strings per rank)."""
    if not env.distributed:
        return digests
    gathered: list[dict | None] = [None] * env.world_size if env.is_main else []
    dist.gather_object(
        {name: digest.model_dump() for name, digest in digests.items()},
        gathered if env.is_main else None,
        dst=0,
    )
    merged: dict[str, FileDigest] = {}
    for part in gathered:
        merged.update({name: FileDigest(**value) for name, value in (part or {}).items()})
    return merged
