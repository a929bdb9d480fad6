"""The same entry points run under the user's own `torchrun`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *args,
    ]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=100, check=False
    )


@pytest.mark.timeout(120)
def test_shardwise_train_under_torchrun(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = torchrun(
        "-m",
        "shardwise",
        "train",
        "--data",
        str(corpus),
        "--model",
        "gru",
        "--max-len",
        "64",
        "--max-steps",
        "2",
        "--sample-bytes",
        "0",
        "--run-dir",
        str(run),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (2, 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("example", ["own_loop.py", "own_loop_pp.py"])
def test_own_loop_examples_train_under_torchrun(tmp_path: Path, example: str) -> None:
    result = torchrun(str(REPO / "examples" / example), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [
        float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("epoch")
    ]
    assert len(losses) == 3
    assert losses[-1] < losses[0]
