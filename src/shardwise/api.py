"""Run a whole training job from Python, exactly as `shardwise train` does.

    summary = shardwise.run(TrainConfig(model="gru", pp=2, microbatches=4, max_steps=100))
    summary["eval_loss"]

Fixes the run directory, checks the input, then holds the run directory (see run_dir.py) while
it trains in this process (one rank) or starts the workers through the elastic agent; returns
rank 0's summary.
"""

from __future__ import annotations

import contextlib
import os

from shardwise.config import TrainConfig
from shardwise.launch import launch_workers
from shardwise.preflight import dry_run, preflight
from shardwise.run_dir import hold_run_dir, launcher_holds_lock, resolve_run_dir
from shardwise.train.worker import run_worker


def run(config: TrainConfig) -> dict:
    """Train as `config` says on this machine's share of the job; rank 0's summary."""
    # Fixed first so that the preflight, the lock and every worker agree on one path.
    run_dir = resolve_run_dir(config)
    config = config.model_copy(update={"run_dir": run_dir})
    nproc = preflight(config)
    # This process outlives every worker it starts, so its lock covers the whole run.
    held = launcher_holds_lock(config)
    with hold_run_dir(config, run_dir) if held else contextlib.nullcontext():
        if nproc == 1 and config.nnodes == 1:
            return run_worker(config.model_dump_json())
        return launch_workers(config, nproc)


def run_as_torchrun_worker(config: TrainConfig) -> dict:
    """Train as one worker of the user's own `torchrun`; global rank 0 holds the run dir.

    run_as_torchrun_worker(config)   # RANK, WORLD_SIZE, ... come from torchrun

    Rank 0 lives for the whole run; the torchrun agent above it is not ours to lock from.
    """
    if os.environ.get("RANK") != "0":
        return run_worker(config.model_dump_json())
    # Resolved here, not in train(): a default runs/<timestamp> must be the locked one, and
    # train() takes rank 0's path for every rank.
    run_dir = resolve_run_dir(config)
    config = config.model_copy(update={"run_dir": run_dir})
    with hold_run_dir(config, run_dir):
        return run_worker(config.model_dump_json())


def plan(config: TrainConfig) -> str:
    """The layout and pipeline cut `run(config)` would use, as `--dry-run` prints it."""
    return dry_run(config, preflight(config))
