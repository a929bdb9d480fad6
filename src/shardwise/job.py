"""Run a whole training job from Python, exactly as `shardwise train` does.

    summary = shardwise.run(TrainConfig(model="gru", pp=2, microbatches=4, max_steps=100))
    summary["eval_loss"]

Checks the input, fixes the run directory, then trains in this process (one rank) or starts
the workers through the elastic agent; returns rank 0's summary.
"""

from __future__ import annotations

from shardwise.config import TrainConfig
from shardwise.launch import launch_workers, run_worker
from shardwise.preflight import dry_run, preflight
from shardwise.train.run import resolve_run_dir


def run(config: TrainConfig) -> dict:
    """Train as `config` says on this machine's share of the job; rank 0's summary."""
    nproc = preflight(config)
    # Fixed here so that every worker (and the caller) agrees on one path.
    config = config.model_copy(update={"run_dir": resolve_run_dir(config)})
    if nproc == 1 and config.nnodes == 1:
        return run_worker(config.model_dump_json())
    return launch_workers(config, nproc)


def plan(config: TrainConfig) -> str:
    """The layout and pipeline cut `run(config)` would use, as `--dry-run` prints it."""
    return dry_run(config, preflight(config))
