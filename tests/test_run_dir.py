"""A run dir belongs to one run: a live run's lock, a used dir's refusal, and --overwrite."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import shardwise
from helpers import metrics, quick_config
from shardwise.cli import main
from shardwise.config import TrainConfig
from shardwise.errors import ShardwiseError
from shardwise.run_dir import (
    LOCK_FILE,
    WRITTEN_BY_RUNS,
    check_run_dir,
    hold_run_dir,
    is_used,
    launcher_holds_lock,
    rank_zero_holds_lock,
    remove_run_outputs,
)
from shardwise.stores import free_port

pytestmark = pytest.mark.timeout(120)

HOLDER = """
    import sys, time
    from pathlib import Path
    from shardwise.config import TrainConfig
    from shardwise.run_dir import hold_run_dir

    run_dir = Path(sys.argv[1])
    with hold_run_dir(TrainConfig(run_dir=run_dir), run_dir):
        print("held", flush=True)
        time.sleep(600)
"""


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def holder(run: Path) -> Iterator[subprocess.Popen]:
    """Another process that holds `run` as a live run would, until the test ends or kills it."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(run)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)


def quick_flags(corpus: Path, run: Path, *extra: str) -> list[str]:
    """`shardwise train` flags for the same small run as helpers.quick_config, on one process."""
    return [
        "train",
        *("--data", str(corpus), "--run-dir", str(run), "--model", "gru", "--max-len", "64"),
        *("--max-steps", "3", "--batch-size", "4", "--batching", "fixed", "--nproc", "1"),
        *("--no-tensorboard", "--sample-bytes", "0", "--timeout-s", "60", "--log-every", "1"),
        *("--warmup-steps", "1", "--clip-norm", "0", "--lr", "3e-3"),
        *extra,
    ]


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("shardwise: error: ")
    return lines[0]


def names_the_holder(message: str, holder: subprocess.Popen) -> None:
    assert f"is in use by another run (pid {holder.pid} on {socket.gethostname()}, since" in message


def test_a_second_run_on_a_live_run_dir_is_refused_naming_the_first(
    corpus: Path, run: Path, holder: subprocess.Popen, capsys: pytest.CaptureFixture
) -> None:
    assert main(quick_flags(corpus, run)) == 2
    names_the_holder(one_error_line(capsys), holder)
    with pytest.raises(ShardwiseError) as refused:
        shardwise.run(quick_config(corpus, run, nproc=2))
    names_the_holder(str(refused.value), holder)
    assert sorted(path.name for path in run.iterdir()) == [LOCK_FILE]  # nothing written


def test_a_run_that_loses_the_race_after_its_preflight_is_refused_the_same_way(
    corpus: Path, run: Path, holder: subprocess.Popen
) -> None:
    # The preflight's look and the real lock are apart in time; the lock itself decides.
    with pytest.raises(ShardwiseError) as refused, hold_run_dir(quick_config(corpus, run), run):
        pass
    names_the_holder(str(refused.value), holder)
    assert "\n" not in str(refused.value)


def test_a_killed_run_does_not_block_the_next(
    corpus: Path, run: Path, holder: subprocess.Popen
) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    result = shardwise.run(quick_config(corpus, run, nproc=1))
    assert result.steps == 3
    record = json.loads((run / LOCK_FILE).read_text())
    assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
    check_run_dir(quick_config(corpus, run, resume=run), run)  # released when the run ended


def test_under_torchrun_rank_0_holds_the_run_dir(
    corpus: Path, run: Path, holder: subprocess.Popen, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **{"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"},
        "MASTER_PORT": str(free_port()),
    }
    result = subprocess.run(
        [sys.executable, "-m", "shardwise", *quick_flags(corpus, run)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    names_the_holder(result.stderr, holder)


def test_a_plain_rerun_in_a_used_run_dir_is_refused_and_resume_continues_it(
    corpus: Path, run: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(quick_flags(corpus, run)) == 0
    capsys.readouterr()
    before = (run / "metrics.jsonl").read_bytes()
    assert main(quick_flags(corpus, run)) == 2
    line = one_error_line(capsys)
    used = "checkpoints/, metrics.jsonl, summary.json"
    assert f"--run-dir {run} already holds a run ({used})" in line
    assert "--resume" in line and "--overwrite" in line
    assert (run / "metrics.jsonl").read_bytes() == before

    result = shardwise.run(quick_config(corpus, run, nproc=1, max_steps=5, resume=run))
    assert result.steps == 5
    assert [row["step"] for row in metrics(run)] == [1, 2, 3, 4, 5]


@pytest.mark.timeout(180)
def test_overwrite_replaces_the_run_and_keeps_the_users_files(corpus: Path, run: Path) -> None:
    # Two ranks and TensorBoard: every kind of output a run leaves must be one --overwrite knows.
    shardwise.run(quick_config(corpus, run, nproc=2, tensorboard=True, checkpoint_every=1))
    written = {path.name for path in run.iterdir()} - {LOCK_FILE}
    assert written <= set(WRITTEN_BY_RUNS), written - set(WRITTEN_BY_RUNS)
    (run / "notes.txt").write_text("mine")
    (run / "figure.png").write_bytes(b"mine too")

    result = shardwise.run(quick_config(corpus, run, nproc=1, max_steps=2, overwrite=True))
    assert result.steps == 2
    assert [row["step"] for row in metrics(run)] == [1, 2]  # not appended to the old rows
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert not (run / "tensorboard").exists()
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "figure.png").read_bytes() == b"mine too"
    saved = tomllib.loads((run / "config.toml").read_text())
    assert "overwrite" not in saved  # a copy of it given as --config must not overwrite


def test_overwrite_removes_a_link_not_what_it_points_to(tmp_path: Path, run: Path) -> None:
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"keep")
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere)
    (run / "summary.json").symlink_to(elsewhere / "data.bin")
    remove_run_outputs(run)
    assert list(run.iterdir()) == []
    assert (elsewhere / "data.bin").read_bytes() == b"keep"


def used_dir(run: Path) -> Path:
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    return run


@pytest.mark.parametrize(
    ("resume", "overwrite", "refused"),
    [
        (None, False, "already holds a run (checkpoints/)"),
        (None, True, None),
        ("run", False, None),
        ("checkpoint", False, None),
        ("other run", False, "already holds a run"),  # continues another run, but writes here
        ("other run", True, None),
        ("run", True, "which --overwrite would delete"),
    ],
)
def test_who_may_use_a_used_run_dir(
    tmp_path: Path, run: Path, resume: str | None, overwrite: bool, refused: str | None
) -> None:
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    resumed = {
        None: None,
        "run": run,
        "checkpoint": run / "checkpoints" / "step_00000003",
        "other run": tmp_path / "other",
    }[resume]
    config = TrainConfig(run_dir=run, resume=resumed, overwrite=overwrite)
    if refused is None:
        check_run_dir(config, run)
    else:
        with pytest.raises(ShardwiseError, match=re.escape(refused)):
            check_run_dir(config, run)


def test_a_fresh_or_missing_dir_is_not_used(run: Path) -> None:
    assert is_used(run) == []
    run.mkdir()
    (run / "config.toml").write_text("")  # a run that died before its first step
    (run / "notes.txt").write_text("")
    assert is_used(run) == []
    check_run_dir(TrainConfig(run_dir=run), run)


def test_only_one_side_of_a_job_holds_the_run_dir() -> None:
    one_node = TrainConfig()
    node_0 = TrainConfig(nnodes=2, node_rank=0, rdzv_endpoint="h:1")
    node_1 = TrainConfig(nnodes=2, node_rank=1, rdzv_endpoint="h:1")
    either = TrainConfig(nnodes=2, rdzv_endpoint="h:1")
    assert [launcher_holds_lock(c) for c in (one_node, node_0, node_1, either)] == [
        True,
        True,
        False,
        False,
    ]
    assert [rank_zero_holds_lock(c) for c in (one_node, node_0, node_1, either)] == [
        False,
        False,
        False,
        True,
    ]


def test_another_node_of_the_same_job_does_not_trip_over_node_0s_lock(
    run: Path, holder: subprocess.Popen
) -> None:
    # On a shared file system node 0 may already hold the dir when node 1 runs its preflight.
    check_run_dir(TrainConfig(nnodes=2, node_rank=1, rdzv_endpoint="h:1"), run)
    with pytest.raises(ShardwiseError, match="in use by another run"):
        check_run_dir(TrainConfig(nnodes=2, node_rank=0, rdzv_endpoint="h:1"), run)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("static", [True, False], ids=["node-rank", "rendezvous-order"])
def test_two_nodes_sharing_a_run_dir_train_as_one_run(
    corpus: Path, run: Path, tmp_path: Path, static: bool
) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shardwise",
                *quick_flags(corpus, run, "--nnodes", "2", "--rdzv-endpoint", endpoint),
                *(["--node-rank", str(node)] if static else []),
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=240) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (2, 3)
    # Node 0's launcher held it; without --node-rank, global rank 0's worker did.
    holder = json.loads((run / LOCK_FILE).read_text())["pid"]
    if static:
        assert holder == nodes[0].pid
    else:
        assert holder not in {node.pid for node in nodes}


@pytest.mark.timeout(180)
def test_every_file_a_run_writes_takes_the_umasks_mode(corpus: Path, run: Path) -> None:
    # 027 rather than the usual 022: a file created 0644 or 0600 whatever the umask shows up.
    before = os.umask(0o027)
    try:
        assert main(quick_flags(corpus, run, "--tensorboard", "--sample-bytes", "8")) == 0
    finally:
        os.umask(before)
    modes = {
        str(path.relative_to(run)): oct(path.stat().st_mode & 0o777)
        for path in run.rglob("*")
        if path.is_file()
    }
    assert {"summary.json", "report.md", "metrics.jsonl", "config.toml"} <= modes.keys()
    assert {"model.safetensors", "loss.png", "checkpoints/step_00000003/rng/rank0.safetensors"} <= (
        modes.keys()
    )
    assert any(name.startswith("tensorboard/") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != oct(0o640)} == {}
