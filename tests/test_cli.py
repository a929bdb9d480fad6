"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardwise.cli import main
from shardwise.distributed import resolve_device
from shardwise.errors import ShardwiseError


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(["train", *args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("shardwise: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def bad_input_cases(tmp_path: Path, corpus: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    config = tmp_path / "bad.toml"
    config.write_text("learning_rate = 0.1\n")
    return {
        "missing data": (["--data", str(tmp_path / "nope.txt")], ("nope.txt", "not found")),
        "empty data": (["--data", str(empty)], ("empty.txt",)),
        "binary data": (["--data", str(binary)], ("binary",)),
        "model import": (
            ["--data", str(corpus), "--model", "no_such_pkg.mod:make"],
            ("no_such_pkg",),
        ),
        "unknown model": (["--data", str(corpus), "--model", "lstmm"], ("lstmm",)),
        "unknown key": (["--data", str(corpus), "--config", str(config)], ("learning_rate",)),
        "wrong type": (["--data", str(corpus), "--batch-size", "lots"], ("batch_size", "lots")),
        "batch too big": (
            ["--data", str(corpus), "--batch-size", "500", "--nproc", "2"],
            ("fewer than one global batch",),
        ),
        "fp16 on cpu": (
            ["--data", str(corpus), "--precision", "fp16", "--device", "cpu"],
            ("bf16",),
        ),
        "resume nothing": (
            ["--data", str(corpus), "--resume", str(tmp_path)],
            ("no complete checkpoint",),
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing data",
        "empty data",
        "binary data",
        "model import",
        "unknown model",
        "unknown key",
        "wrong type",
        "batch too big",
        "fp16 on cpu",
        "resume nothing",
    ],
)
def test_bad_input_is_one_clear_line(
    case: str, tmp_path: Path, corpus: Path, run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    args, fragments = bad_input_cases(tmp_path, corpus)[case]
    code, err = run_cli([*args, "--run-dir", str(run_dir)], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not run_dir.exists()


def test_port_already_in_use(corpus: Path, run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_cli(
            [
                "--data",
                str(corpus),
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--run-dir",
                str(run_dir),
            ],
            capsys,
        )
    assert_one_line_error(code, err, f"port {port} is already in use")
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu(corpus: Path, run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run_cli(["--data", str(corpus), "--device", "cuda"], capsys)
    assert_one_line_error(code, err, "no CUDA GPU", "--device cpu")


def test_more_processes_than_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ShardwiseError, match="--nproc 3 with --device cuda: only 2 GPU"):
        resolve_device("cuda", nproc=3)


@pytest.mark.timeout(60)
def test_the_real_command_exits_non_zero_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardwise", "train", "--data", str(tmp_path / "absent.txt")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("shardwise: error:")


def test_help_documents_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--data",
        "--model",
        "--nproc",
        "--device",
        "--max-steps",
        "--batch-size",
        "--grad-accum",
        "--precision",
        "--clip-norm",
        "--lr",
        "--seed",
        "--run-dir",
        "--checkpoint-every",
        "--resume",
        "--nnodes",
        "--node-rank",
        "--rdzv-endpoint",
        "--config",
    ):
        assert flag in text
