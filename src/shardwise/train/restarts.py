"""Automatic recovery: what a restarted worker group continues from, and the record of restarts.

    config = config_for_attempt(config, run_dir)          # resume from the newest checkpoint
    restarts = record_restart(folder, env, config, run_dir)   # summary.json's "restarts"

The elastic agent restarts a failed worker group (--max-restarts), or a healthy one to admit a
node arriving late (--nnodes MIN:MAX); the new workers learn which attempt they are from the
rendezvous round (shardwise.distributed.attempt_number). The launcher's folder outlives every
attempt, so each attempt leaves notes there under `attempt<N>/`: rank 0's last finished step,
and each rank's way out (a user error or lost peer, an exception, stopped by the agent). A
rank with no note at all is the one that died (a signal, os._exit, the OOM killer). The
restarted group reads the previous attempt's notes, every rank its own node's, and rank 0 adds
one record to `restarts.json`: when, which rank, why, the step it resumed from, steps lost.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import torch.distributed as dist

from shardwise.checkpoint import find_checkpoint, latest_checkpoint, read_state
from shardwise.config import TrainConfig
from shardwise.distributed import DistEnv, attempt_number
from shardwise.errors import ShardwiseError
from shardwise.handoff import attempt_dir
from shardwise.report.metrics import METRICS_FILE
from shardwise.safe_write import replace_file

RESTARTS_FILE = "restarts.json"
_PROGRESS_FILE = "progress.json"
_WORLD_FILE = "world_size.txt"  # each node's copy: the node that held rank 0 may be gone
_RECORD = re.compile(r"^(?P<kind>[a-z]+)-rank(?P<rank>\d+)\.(json|txt)$")


def restart_count() -> int:
    """How many times this worker group was restarted (0: the first attempt), on every node.

    The agent's restarts after a failure, and those that admit a node arriving late.
    """
    return attempt_number()


def note_progress(folder: Path, step: int) -> None:
    """Rank 0, after each step: how far this attempt got (a restart counts the steps lost)."""
    (attempt_dir(folder) / _PROGRESS_FILE).write_text(str(step), encoding="ascii")


def config_for_attempt(config: TrainConfig, run_dir: Path) -> TrainConfig:
    """After a restart: continue from the run dir's newest checkpoint, else begin as at first.

    Never --overwrite again: that would delete what the failed attempt saved. On fewer nodes of
    an elastic --nnodes MIN:MAX range each rank accumulates more (`elastic_accumulation`).
    """
    config = elastic_accumulation(config, int(os.environ.get("WORLD_SIZE", "1")))
    if restart_count() == 0:
        return config
    newest = latest_checkpoint(run_dir / "checkpoints")
    resume = run_dir if newest is not None else config.resume
    return config.model_copy(update={"resume": resume, "overwrite": False, "run_dir": run_dir})


def elastic_accumulation(config: TrainConfig, world_size: int) -> TrainConfig:
    """`config` with the accumulation that keeps the full world's global batch on `world_size`.

        elastic_accumulation(TrainConfig(nnodes="1:2", nproc=2, ...), 2).grad_accum   # 2

    --grad-accum is the full world's (--nnodes MAX); each optimizer step takes the same slice
    of the data stream whatever the world, since the samplers cut a step into replicas x
    accumulation batches: the tokens per step and the data order stay exactly the same.
    """
    if not config.elastic:
        return config
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", config.nproc or 1))
    full, now = config.layout(config.nnodes * per_node).dp, config.layout(world_size).dp
    if (full * config.grad_accum) % now:
        raise ShardwiseError(
            f"--nnodes {config.min_nodes}:{config.nnodes}: {world_size} ranks make {now} "
            f"replicas, which cannot split the global batch of {full} replicas x --grad-accum "
            f"{config.grad_accum}; give every node the same --nproc"
        )
    return config.model_copy(update={"grad_accum": full * config.grad_accum // now})


def record_restart(folder: Path, env: DistEnv, config: TrainConfig, run_dir: Path) -> list[dict]:
    """Every restart of this run so far, this one last (first attempt: none); every rank calls.

    Rank 0 writes the list to the launcher's folder, drops metrics rows of lost steps, and
    prints one line about the restart.
    """
    attempt = restart_count()
    (attempt_dir(folder) / _WORLD_FILE).write_text(str(env.world_size), encoding="ascii")
    if attempt == 0:
        return []
    previous = attempt_dir(folder, attempt - 1)
    local = {
        "notes": _read_notes(previous),
        "reached": _read_progress(previous),
        "history": _read_history(folder),
        "world_size": _read_number(previous / _WORLD_FILE),
    }
    everyone: list[Any] = [local]
    if env.distributed:
        everyone = [None] * env.world_size
        dist.all_gather_object(everyone, local)
    notes: dict[int, dict[str, dict]] = {}
    for part in everyone:
        for rank, kinds in part["notes"].items():
            notes.setdefault(int(rank), {}).update(kinds)
    history = max((part["history"] for part in everyone), key=len)
    if not env.is_main:
        return history
    resumed = _resumed_step(config)
    reached = max((part["reached"] for part in everyone if part["reached"] is not None), default=0)
    before = max((part["world_size"] or 0 for part in everyone), default=0) or env.world_size
    rank, reason = failure_cause(notes, before)
    if rank is None and env.world_size > before:  # the agents restarted to admit a node
        reason = f"nodes joined: {before} -> {env.world_size} ranks"
    elif env.world_size < before:  # --nnodes MIN:MAX goes on without a lost node
        reason += f"; nodes left: {before} -> {env.world_size} ranks"
    record = {
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "rank": rank,
        "reason": reason,
        "resumed_from_step": resumed,
        "steps_lost": max(0, reached - resumed),
        "world_size": env.world_size,  # fewer ranks after a lost node (--nnodes MIN:MAX)
    }
    history = [*history, record]
    (folder / RESTARTS_FILE).write_text(json.dumps(history), encoding="utf-8")
    drop_metrics_after(run_dir, resumed)
    print(
        f"shardwise: restart {attempt} of {config.max_restarts}: {reason}; resuming from step "
        f"{resumed} ({record['steps_lost']} steps lost)",
        flush=True,
    )
    return history


def failure_cause(notes: dict[int, dict[str, dict]], world_size: int) -> tuple[int | None, str]:
    """Which rank ended an attempt and why, in one line, from the ranks' notes.

    failure_cause({0: {"stopped": {}}}, 2)   # (1, "worker rank 1 exited without ...")

    A user error first, then an exception, then a rank that left no note (it died); a rank that
    only lost its peers, or was stopped by the agent, is the cause only when nothing else is.
    """
    for rank, kinds in sorted(notes.items()):
        error = kinds.get("error")
        if error and not error.get("peer_lost"):
            return rank, str(error["message"])
    for rank, kinds in sorted(notes.items()):
        if "raised" in kinds:
            return rank, f"worker rank {rank} failed: {kinds['raised']['message']}"
    silent = [rank for rank in range(world_size) if rank not in notes]
    if silent:
        return silent[0], (
            f"worker rank {silent[0]} exited without an error record (killed by a signal, the "
            "out-of-memory killer, or os._exit)"
        )
    for rank, kinds in sorted(notes.items()):
        if "error" in kinds:
            return rank, str(kinds["error"]["message"])
    return None, "the worker group stopped without a recorded cause"


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """Keep only metrics.jsonl rows up to `step`: the lost steps are trained again."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    replace_file(path, "".join(line + "\n" for line in kept))  # a link there stays untouched


def _resumed_step(config: TrainConfig) -> int:
    """The step the restarted group continues from: its checkpoint's (0: from the start)."""
    if config.resume is None:
        return 0
    try:
        return read_state(find_checkpoint(config.resume)).step
    except (ShardwiseError, OSError, ValueError):
        return 0  # the resume itself reports what is wrong with it


def _read_notes(previous: Path) -> dict[str, dict[str, dict]]:
    notes: dict[str, dict[str, dict]] = {}
    for path in previous.iterdir():
        match = _RECORD.match(path.name)
        if match:
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # cut short as its worker was killed
                payload = {}
            notes.setdefault(match["rank"], {})[match["kind"]] = payload
    return notes


def _read_progress(previous: Path) -> int | None:
    return _read_number(previous / _PROGRESS_FILE)


def _read_number(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None


def _read_history(folder: Path) -> list[dict]:
    try:
        return list(json.loads((folder / RESTARTS_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return []
