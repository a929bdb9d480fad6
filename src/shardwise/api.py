"""Run a whole training job from Python, exactly as `shardwise train` does.

    result = shardwise.run(TrainConfig(model="gru", pp=2, microbatches=4, max_steps=100))
    result.eval_loss, result.load_model()

Fixes the run directory, checks the input, then holds the run directory (see run_dir.py) while
it trains in this process (one rank) or starts the workers through the elastic agent; returns
rank 0's summary as a `RunResult`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from shardwise.agent import launch_workers
from shardwise.config import TrainConfig
from shardwise.distributed import resolve_device
from shardwise.handoff import Preempted
from shardwise.preflight import RunPlan, default_nproc, preflight
from shardwise.report.result import RunResult
from shardwise.run_dir import hold_run_dir, launcher_holds_lock, resolve_run_dir
from shardwise.techniques import processes_beside
from shardwise.train.restarts import restart_count
from shardwise.train.worker import run_worker


def run(config: TrainConfig) -> RunResult | None:
    """Train as `config` says on this machine's share of the job; rank 0's result.

    None only on a node of a multi-node job whose workers do not include rank 0. Workers are
    started as commands, not by importing the caller's script again, so a script calling this
    needs no `if __name__ == "__main__":` guard. A failed worker group is restarted
    (`max_restarts`) and resumes by itself; SIGTERM or Ctrl-C raises `Preempted` (from
    shardwise.train.preemption) naming the checkpoint saved, which `resume` continues.
    """
    # Fixed first so that the preflight, the lock and every worker agree on one path.
    run_dir = resolve_run_dir(config)
    config = config.model_copy(update={"run_dir": run_dir})
    with _stopped_by_sigterm():  # from the first line on; the launch installs its own
        _say_what_starts(config)
        nproc = preflight(config).processes  # workers, and e.g. parameter servers
        # This process outlives every worker it starts, so its lock covers the whole run.
        held = launcher_holds_lock(config)
        with hold_run_dir(config, run_dir) if held else contextlib.nullcontext():
            if nproc == 1 and config.nnodes == 1:
                summary = run_worker(config.model_dump_json())
            else:
                summary = launch_workers(config, nproc)
    # The caller's own config names the model: loading it needs no second word from them.
    return None if summary is None else RunResult.from_summary(summary, run_dir, model=config.model)


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM before (or between) the launcher's own handlers: a run stopped, said in a line.

    Without it a SIGTERM during the seconds of checks ended the process silently (status 143);
    workers, if any had started, die with it anyway (they ask the kernel to: die_with_parent).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; the caller's own then apply
        return

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise Preempted(None, None, signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _say_what_starts(config: TrainConfig) -> None:
    """One line before the checks (which read the data and build the model, seconds)."""
    nproc = default_nproc(config)
    device = resolve_device(config.device, nproc).type
    nodes = f" on each of {config.nnodes} nodes" if config.nnodes > 1 else ""
    beside = "".join(f" and {other.count} {other.what}" for other in processes_beside(config))
    print(
        f"shardwise: run dir {config.run_dir}: {nproc} worker(s){beside} on {device}{nodes}; "
        "checking the model and data",
        flush=True,  # stdout, with the progress it announces; stderr keeps errors to one line
    )


def run_as_torchrun_worker(config: TrainConfig) -> RunResult | None:
    """Train as one worker of the user's own `torchrun`; global rank 0 holds the run dir.

    result = run_as_torchrun_worker(config)   # RANK, WORLD_SIZE, ... come from torchrun

    Rank 0 lives for the whole run; the torchrun agent above it is not ours to lock from. Rank 0
    gets the run's result, every other rank None (only rank 0 exports the model and sums up).
    """
    if os.environ.get("RANK") != "0":
        run_worker(config.model_dump_json())
        return None
    # Resolved here, not in train(): a default runs/<timestamp> must be the locked one, and
    # train() takes rank 0's path for every rank.
    run_dir = resolve_run_dir(config)
    config = config.model_copy(update={"run_dir": run_dir})
    # Under `torchrun --max-restarts`, a restarted rank 0 continues the same run.
    with hold_run_dir(config, run_dir, restarted=restart_count() > 0):
        summary = run_worker(config.model_dump_json())
        return RunResult.from_summary(summary, run_dir, model=config.model)


def plan(config: TrainConfig) -> RunPlan:
    """What `run(config)` would train: layout, pipeline cut and predictions, checked.

    plan = plan(TrainConfig(pp=2))
    plan.cuts, print(plan.describe())   # describe() is what --dry-run prints

    The cut is the one the run will train: the workers build it the same way and reuse this
    profile's cut (see train/build.py).
    """
    return preflight(config)
