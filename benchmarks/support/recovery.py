"""Time from a killed worker to training again, and the steps of work it cost.

    figures = recovery(args)   # {"recovery_s": 9.8, "recovery_s_range": [...], "steps_lost": 2}

Each round runs `shardwise train` on 2 CPU workers (a tiny GRU, a checkpoint every
--recovery-every steps, --max-restarts 1) with the testing aid SHARDWISE_TESTING_KILL, which
SIGKILLs rank 1 once after step --kill-at. A thread watches metrics.jsonl (a row per step) and
notes when each row appears: recovery is the time from step --kill-at's row to the first row
of the restarted group (the step after the checkpoint it resumed from), so it holds the
failure's detection, the group's teardown and restart, the resume and that one step. Steps lost
come from summary.json's restart record. A duration has no partner to interleave with; the
rounds give its median and min-max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

JOB = ["--nproc", "2", "--device", "cpu", "--model", "gru", "--max-len", "64", "--batching"]
JOB += ["fixed", "--batch-size", "8", "--log-every", "1", "--no-tensorboard", "--sample-bytes"]
JOB += ["0", "--max-restarts", "1"]


def add_recovery_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kill-at", type=int, default=10, help="recovery: rank 1 dies here")
    parser.add_argument("--recovery-every", type=int, default=4, help="recovery: checkpoints")


def recovery(args: argparse.Namespace) -> dict[str, object]:
    """recovery_s (median, min-max over the rounds) and steps_lost of a killed worker."""
    seconds, lost = [], []
    for index in range(args.rounds):
        took, steps = _one_recovery(args)
        seconds.append(took)
        lost.append(steps)
        print(f"recovery round {index + 1}/{args.rounds}: {took:.1f} s, {steps} steps lost")
    return {
        "recovery_s": round(statistics.median(seconds), 2),
        "recovery_s_range": [round(min(seconds), 2), round(max(seconds), 2)],
        "steps_lost": statistics.median(lost),
        "recovery_kill_at_step": args.kill_at,
        "recovery_checkpoint_every": args.recovery_every,
    }


def _one_recovery(args: argparse.Namespace) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="recovery-") as scratch:
        run_dir = Path(scratch) / "run"
        rows: list[tuple[float, int]] = []  # (when it appeared, step), in order of appearance
        done = threading.Event()
        watcher = threading.Thread(target=_watch, args=(run_dir / "metrics.jsonl", rows, done))
        watcher.start()
        command = [sys.executable, "-m", "shardwise", "train", *JOB, "--run-dir", str(run_dir)]
        command += ["--max-steps", str(args.kill_at + 2 * args.recovery_every)]
        command += ["--checkpoint-every", str(args.recovery_every)]
        environment = os.environ | {"SHARDWISE_TESTING_KILL": f"1:{args.kill_at}"}
        try:
            subprocess.run(command, env=environment, capture_output=True, check=True, timeout=600)
        finally:
            done.set()
            watcher.join()
        restarts = json.loads((run_dir / "summary.json").read_text())["restarts"]
    killed = next(when for when, step in rows if step == args.kill_at)
    after = [(when, step) for when, step in rows if when > killed and step <= args.kill_at]
    return after[0][0] - killed, int(restarts[0]["steps_lost"])


def _watch(path: Path, rows: list[tuple[float, int]], done: threading.Event) -> None:
    """Note each new metrics row's step as it appears (the file may be cut back on a restart)."""
    seen = 0
    while not done.wait(0.02):
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue
        now = time.monotonic()
        if len(lines) < seen:  # the restart dropped the lost steps' rows
            seen = len(lines)
        for line in lines[seen:]:
            if line.endswith("}"):
                rows.append((now, json.loads(line)["step"]))
                seen += 1
