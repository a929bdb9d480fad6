"""A full disk or a read-only run directory during a save: one line, exit status 2, and the
earlier checkpoints intact, verified and the ones `--resume` takes.

These mount small tmpfs filesystems, which needs root (CAP_SYS_ADMIN): they skip otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardwise.checkpoint import candidates, choose_checkpoint, verify_checkpoint
from train_cli import run_train

pytestmark = pytest.mark.timeout(400)

# One checkpoint of train_cli's quick GRU run is about 9.4 MB: two fit, the third does not.
_ROOM_FOR_TWO = "24m"
_ERROR = re.compile(r"^shardwise: error: .*: (.+) writing checkpoint (step_\d{8})")


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount ({result.stderr.strip()}): needs CAP_SYS_ADMIN")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount afterwards, last mounted first."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; run as root to test full and read-only disks")
    mounted: list[Path] = []
    yield mounted
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def _tmpfs(point: Path, size: str, mounts: list[Path]) -> Path:
    point.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point))
    mounts.append(point)
    return point


def _one_line_error(result: subprocess.CompletedProcess) -> re.Match:
    """The run ended with status 2 and one error line, and printed no traceback at all."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("shardwise: error:")]
    assert len(errors) == 1, output
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert len(result.stderr.strip().splitlines()) <= 8, result.stderr  # notes, then the line
    match = _ERROR.match(errors[0])
    assert match is not None, errors[0]
    return match


@pytest.mark.parametrize("mode", ["--checkpoint-async", "--no-checkpoint-async"])
def test_a_full_disk_ends_in_one_line_and_the_earlier_checkpoints_resume(
    corpus: Path, tmp_path: Path, mounts: list[Path], mode: str
) -> None:
    run = _tmpfs(tmp_path / "run", _ROOM_FOR_TWO, mounts)
    flags = ("--max-steps", "8", "--checkpoint-every", "1", mode)
    match = _one_line_error(run_train(corpus, run, *flags))
    reason, failed = match.groups()
    assert reason == "no space left on device"
    kept = candidates(run / "checkpoints")
    assert [path.name for path in kept] == ["step_00000002", "step_00000001"]
    assert failed == "step_00000003"
    assert "the newest is step_00000002" in match.string
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == [
        "step_00000001",
        "step_00000002",
    ]  # the half-written one is gone, and its space with it
    for path in kept:
        verify_checkpoint(path)

    moved = tmp_path / "moved"  # the user frees space: here, by moving the run elsewhere
    shutil.copytree(run, moved)
    assert choose_checkpoint(moved)[0] == moved / "checkpoints" / "step_00000002"
    resumed = run_train(corpus, moved, "--max-steps", "3", "--resume", str(moved))
    assert resumed.returncode == 0, resumed.stderr


def test_a_read_only_checkpoint_dir_ends_in_one_line_and_leaves_the_checkpoints(
    corpus: Path, tmp_path: Path, mounts: list[Path]
) -> None:
    run = _tmpfs(tmp_path / "run", "64m", mounts)
    first = run_train(corpus, run, "--max-steps", "2", "--checkpoint-every", "1")
    assert first.returncode == 0, first.stderr
    checkpoints = run / "checkpoints"
    before = sorted(path.name for path in checkpoints.iterdir())
    _mount("--bind", str(checkpoints), str(checkpoints))
    mounts.append(checkpoints)
    _mount("-o", "remount,ro,bind", str(checkpoints))

    flags = ("--max-steps", "4", "--checkpoint-every", "1", "--resume", str(run))
    reason, failed = _one_line_error(run_train(corpus, run, *flags)).groups()
    assert (reason, failed) == ("read-only file system", "step_00000003")
    assert sorted(path.name for path in checkpoints.iterdir()) == before
    assert choose_checkpoint(run)[0] == checkpoints / "step_00000002"


def test_a_read_only_run_dir_is_refused_in_one_line(
    corpus: Path, tmp_path: Path, mounts: list[Path]
) -> None:
    run = _tmpfs(tmp_path / "run", "64m", mounts)
    first = run_train(corpus, run, "--max-steps", "1")
    assert first.returncode == 0, first.stderr
    _mount("-o", "remount,ro", str(run))
    result = run_train(corpus, run, "--max-steps", "2", "--resume", str(run))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("shardwise: error: --run-dir")
    assert "Read-only file system" in result.stderr
    verify_checkpoint(run / "checkpoints" / "step_00000001")
