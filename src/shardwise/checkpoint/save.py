"""Write a checkpoint that is either whole and verified or not there at all.

    path = save_checkpoint(run_dir / "checkpoints", model, optimizer, state, env)

Every rank writes into `step_XXXXXXXX.partial/`: DCP shards with tensors only (the optimizer's
hyperparameters go to the JSON state), and its RNG state as safetensors. Each rank hashes what
it wrote; rank 0 writes the trainer state and, last, the manifest of every file's digest, then
swaps the directory in under its final name. A step saved again replaces the old checkpoint in
one rename, so a kill at any instant leaves the old or the new one whole. A save in the
background (`background.py`) takes the same snapshot and seals it the same way, later.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from shardwise.checkpoint.disk import SAVE_ERRORS, CheckpointWriteError, run_agreed, settle
from shardwise.checkpoint.files import remove_tree, replace_directory, write_durably
from shardwise.checkpoint.listing import PARTIAL_SUFFIX
from shardwise.checkpoint.manifest import FileDigest, digest_files, write_manifest
from shardwise.checkpoint.retention import Retention, prune
from shardwise.checkpoint.state import STATE_FILE, TrainerState
from shardwise.distributed import DistEnv


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


@dataclass
class Snapshot:
    """One save, as it was when asked for: where it goes and what it holds.

    The trainer goes on changing the live state while a background save writes, so the trainer
    state is JSON and the RNG states are copies from the moment of the save.
    """

    final: Path
    tensors: dict
    state_json: str
    rng: dict[str, torch.Tensor]
    retention: Retention = field(default_factory=Retention)

    @property
    def partial(self) -> Path:
        return self.final.with_name(self.final.name + PARTIAL_SUFFIX)


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
    retention: Retention | None = None,
) -> Path:
    """Write a checkpoint for `state.step` under `directory`; returns its final path.

    A full disk or a read-only directory raises a one-line ShardwiseError on every rank, and the
    earlier checkpoints stay as they were.
    """
    snapshot = take_snapshot(directory, model, optimizer, state, sync, retention)
    return write_checkpoint(snapshot, env)


def write_checkpoint(snapshot: Snapshot, env: DistEnv) -> Path:
    """Write and seal `snapshot` now, on every rank; returns its final path."""
    start_partial(snapshot, env)
    failed = None
    with warnings.catch_warnings():
        # A single process has no group; DCP warns that it will save alone, as intended.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.save(snapshot.tensors, checkpoint_id=snapshot.partial)
        except SAVE_ERRORS as exc:  # agreed on and reported by seal()
            failed = exc
    return seal(snapshot, env, failed=failed)


def take_snapshot(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    sync: SyncState | None = None,
    retention: Retention | None = None,
) -> Snapshot:
    """What a save of `state.step` writes, taken now (the tensors are still the live ones)."""
    tensors, state.optimizer_groups = split_optimizer_state(model, optimizer)
    sync = sync or SyncState()
    if sync.replica is not None:  # the same tensors twice: DCP keeps one replica's "model"
        tensors["replica"] = {replica_key(sync.replica): dict(tensors)}
    if sync.tensors:
        tensors["sync"] = dict(sync.tensors)
    final = Path(directory) / checkpoint_name(state.step)
    return Snapshot(final, tensors, state.to_json(), _rng_states(), retention or Retention())


def start_partial(snapshot: Snapshot, env: DistEnv) -> None:
    """Rank 0 makes an empty `.partial` directory; every rank learns whether it could."""

    def make() -> None:
        # Left by a run killed mid-save, or a link planted there: removed as itself.
        remove_tree(snapshot.partial, ignore_errors=True)
        snapshot.partial.mkdir(parents=True)

    run_agreed(make if env.is_main else None, snapshot.final, env)


def seal(
    snapshot: Snapshot,
    env: DistEnv,
    group: dist.ProcessGroup | None = None,
    failed: BaseException | None = None,
) -> Path:
    """After every rank wrote its shards: RNG files, digests, trainer state, manifest, rename.

    `failed` is this rank's error while writing its shards. Every rank learns of any rank's
    failure and raises the same one-line error; the `.partial` directory is then removed, so
    the space a full disk needs comes back and nothing half-written stays.
    """
    partial, rank = snapshot.partial, env.rank
    try:
        digests: dict[str, FileDigest] = {}
        if failed is None:
            try:
                _save_rng(partial / rng_file(rank), snapshot.rng)
                digests = digest_files(partial, [*_shards_of(partial, rank), rng_file(rank)])
            except SAVE_ERRORS as exc:
                failed = exc
        dumped = {name: digest.model_dump() for name, digest in digests.items()}
        shared = settle(failed, snapshot.final, env, group, payload=dumped)
        finish = (lambda: _finish(snapshot, shared)) if env.is_main else None
        run_agreed(finish, snapshot.final, env, group)
    except CheckpointWriteError:
        if env.is_main:
            remove_tree(partial, ignore_errors=True)
        raise
    return snapshot.final


def _finish(snapshot: Snapshot, shared: list[dict]) -> None:
    """Rank 0, once every rank's files are on disk: seal, swap in, prune."""
    partial = snapshot.partial
    digests = {name: FileDigest(**value) for part in shared for name, value in part.items()}
    write_durably(partial / STATE_FILE, snapshot.state_json)
    digests |= digest_files(partial, [STATE_FILE, ".metadata"])
    write_manifest(partial, digests)  # last: the seal
    replace_directory(partial, snapshot.final)
    prune(snapshot.final, snapshot.retention)


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


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}  # a new tensor: later draws do not change it
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _save_rng(path: Path, states: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # As bytes through open(): safetensors' save_file creates its file 0600 whatever the umask,
    # where every other file of a run takes the umask's mode (0644 under 022).
    path.write_bytes(save(states))
