"""Sharded, atomic, verified, reshardable checkpoints that never run code when loaded.

    path = save_checkpoint(run_dir / "checkpoints", model, optimizer, state, env)
    path, notes = agree_on_checkpoint(run_dir, env)          # newest one that verifies
    state = load_checkpoint(path, model, optimizer, env)     # on any number of ranks

A checkpoint `step_00000100/` holds DCP shards of tensors only (model and optimizer state keyed
by parameter name, so another world size or layout loads them), `trainer_state.json`
(schema-checked: step, data position, scheduler, scaler, optimizer hyperparameters, the run's
settings and fingerprints), one `rng/rank<r>.safetensors` per rank, and `manifest.json` with
every file's SHA-256, written last. What is trusted and how each check works:

- `save.py`: written under `.partial`, sealed by the manifest, swapped in atomically.
- `manifest.py`: integrity (a flipped byte, a truncated, missing or extra file) — not
  authenticity: whoever can write the directory can rewrite the manifest too.
- `verified.py`: every file read once, without following links, and checked against the
  manifest as it is read: what is loaded is what was checked, not a file swapped since.
- `metadata.py`: DCP's pickled metadata through an exact allow-list of (module, name) pairs,
  checked before anything is resolved, then rebuilt from checked plain values (no unpickled
  object reaches DCP); tensor items only, so no shard is ever unpickled.
- `reader.py`: tensors loaded only from those checked bytes, of the dtype the model holds.
- `state.py`: the JSON state against a strict schema.
- `find.py`: a run directory resumes from its newest checkpoint that verifies and loads, on
  every rank alike (`agreement.py`); the others are skipped with a line each.
- `background.py`: the same save written by a thread while training goes on (DCP async_save).
- `disk.py`: a full disk or read-only directory is one agreed line on every rank.
- `retention.py`: `--keep-checkpoints K` deletes older sealed ones, never the newest.
- `listing.py`: which checkpoints a folder holds; `check_no_links` refuses a link among them.
"""

from shardwise.checkpoint.background import CheckpointWriter
from shardwise.checkpoint.disk import CheckpointWriteError
from shardwise.checkpoint.errors import CheckpointRejected
from shardwise.checkpoint.find import (
    agree_on_checkpoint,
    candidates,
    choose_checkpoint,
    find_checkpoint,
    is_checkpoint_dir,
    latest_checkpoint,
    load_newest,
)
from shardwise.checkpoint.listing import check_no_links
from shardwise.checkpoint.load import load_checkpoint, load_model_weights, verify_checkpoint
from shardwise.checkpoint.manifest import MANIFEST_FILE
from shardwise.checkpoint.metadata import METADATA_FILE, read_metadata
from shardwise.checkpoint.retention import Retention
from shardwise.checkpoint.save import SyncState, checkpoint_name, save_checkpoint, take_snapshot
from shardwise.checkpoint.state import STATE_FILE, TrainerState, read_state
from shardwise.checkpoint.verified import VerifiedFiles, verify_manifest

__all__ = [
    "MANIFEST_FILE",
    "METADATA_FILE",
    "STATE_FILE",
    "CheckpointRejected",
    "CheckpointWriteError",
    "CheckpointWriter",
    "Retention",
    "SyncState",
    "TrainerState",
    "VerifiedFiles",
    "agree_on_checkpoint",
    "candidates",
    "check_no_links",
    "checkpoint_name",
    "choose_checkpoint",
    "find_checkpoint",
    "is_checkpoint_dir",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "load_newest",
    "read_metadata",
    "read_state",
    "save_checkpoint",
    "take_snapshot",
    "verify_checkpoint",
    "verify_manifest",
]
