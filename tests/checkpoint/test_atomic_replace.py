"""Saving a step again never leaves a moment where no whole checkpoint of it exists."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import shardwise.checkpoint.files as files
from shardwise.checkpoint import TrainerState, choose_checkpoint, save_checkpoint
from shardwise.distributed import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


class Killed(BaseException):
    """Stands in for SIGKILL between two filesystem steps."""


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def save(run: Path, step: int) -> Path:
    return save_checkpoint(
        run / "checkpoints", *model_and_optimizer(), TrainerState(step=step), ENV
    )


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "move-aside"])
def test_a_crash_at_any_filesystem_step_of_a_rewrite_leaves_a_whole_checkpoint(
    tmp_path: Path, monkeypatch, exchange: bool
) -> None:
    real_replace, real_rmtree = files.os.replace, files.shutil.rmtree
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    for crash_at in range(6):
        run = tmp_path / f"crash{crash_at}"
        save(run, 4)
        save(run, 5)
        calls = 0

        def step(real, *args, crash_at=crash_at, **kwargs):
            nonlocal calls
            calls += 1
            if calls > crash_at:
                raise Killed
            return real(*args, **kwargs)

        monkeypatch.setattr(files.os, "replace", lambda *a, **k: step(real_replace, *a, **k))
        monkeypatch.setattr(files.shutil, "rmtree", lambda *a, **k: step(real_rmtree, *a, **k))
        try:
            save(run, 5)
        except Killed:
            pass
        finally:
            monkeypatch.setattr(files.os, "replace", real_replace)
            monkeypatch.setattr(files.shutil, "rmtree", real_rmtree)
        path, state, notes = choose_checkpoint(run)
        assert state.step == 5, (crash_at, path, notes)
        assert notes == []


def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "new").touch()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old").touch()
    if not files._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this filesystem has no renameat2 RENAME_EXCHANGE (the move-aside path runs)")
    assert (tmp_path / "b" / "new").exists()
    assert (tmp_path / "a" / "old").exists()


_REWRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from shardwise.checkpoint import TrainerState, save_checkpoint
    from shardwise.distributed import DistEnv
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(model.parameters())
    run = Path(sys.argv[1])
    save_checkpoint(run, model, optimizer, TrainerState(step=4), env)
    print("ready", flush=True)
    while True:
        save_checkpoint(run, model, optimizer, TrainerState(step=5), env)
    """
)


@pytest.mark.timeout(120)
def test_sigkill_during_repeated_rewrites_never_leaves_the_run_unresumable(tmp_path: Path) -> None:
    rng = random.Random(0)
    for attempt in range(6):
        run = tmp_path / f"run{attempt}"
        child = subprocess.Popen(
            [sys.executable, "-c", _REWRITER, str(run)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        path, state, _ = choose_checkpoint(run)
        assert state.step in (4, 5), path
