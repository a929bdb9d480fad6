"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise import cli
from shardwise.cli import main
from shardwise.config import SECTIONS, Record, TrainConfig
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


# name: (arguments, with {corpus} and {tmp} filled in; fragments the one error line must hold)
BAD_INPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "missing data": ("--data {tmp}/nope.txt", ("nope.txt", "not found")),
    "empty data": ("--data {tmp}/empty.txt", ("empty.txt",)),
    "binary data": ("--data {tmp}/blob.txt", ("binary",)),
    "model import": ("--data {corpus} --model no_such_pkg.mod:make", ("no_such_pkg",)),
    "unknown model": ("--data {corpus} --model lstmm", ("lstmm",)),
    "unknown key": ("--data {corpus} --config {tmp}/bad.toml", ("learning_rate",)),
    "wrong type": ("--data {corpus} --batch-size lots", ("batch_size", "lots")),
    "batch too big": (
        "--data {corpus} --batching fixed --batch-size 500 --nproc 2",
        ("fewer than one global batch",),
    ),
    "too few sequences": (
        "--data {corpus} --grad-accum 200 --nproc 2",
        ("fewer than the 400 batches of one step",),
    ),
    "packing an rnn": ("--data {corpus} --packing", ("packing needs",)),
    "fp16 on cpu": ("--data {corpus} --precision fp16 --device cpu", ("bf16",)),
    "resume nothing": ("--data {corpus} --resume {tmp}", ("no complete checkpoint",)),
    "too many stages": ("--data {corpus} --pp 5 --microbatches 5", ("only 4 pieces",)),
    "layout mismatch": (
        "--data {corpus} --pp 2 --dp 2 --nproc 3",
        ("= 4 ranks, but the job has 3",),
    ),
    "bad split point": (
        "--data {corpus} --pp 2 --split-points blocks.9",
        ("'blocks.9' names no module",),
    ),
    "split count": ("--data {corpus} --pp 3 --split-points blocks.1", ("--pp 3 needs 2",)),
}


def write_bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "bad.toml").write_text("learning_rate = 0.1\n")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(
    case: str, tmp_path: Path, corpus: Path, run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    write_bad_files(tmp_path)
    template, fragments = BAD_INPUTS[case]
    args = template.format(corpus=corpus, tmp=tmp_path).split()
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


def test_dry_run_prints_the_plan_and_trains_nothing(
    corpus: Path, run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        ["train", "--data", str(corpus), "--pp", "2", "--dry-run", "--run-dir", str(run_dir)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "1 data-parallel x 2 pipeline" in out
    assert "split points: " in out
    assert not run_dir.exists()


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"shardwise {shardwise.__version__}"


def without_a_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume continues with the run's own settings; these runs need none of theirs."""
    import shardwise.train.resume

    monkeypatch.setattr(
        shardwise.train.resume, "recorded_settings", lambda path: Record(f"--resume {path}", {})
    )


def test_bare_resume_continues_the_run_dir(
    corpus: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_a_record(monkeypatch)
    launched: list[TrainConfig] = []
    monkeypatch.setattr(cli, "_launch", lambda config, dry=False: launched.append(config) or 0)
    code = main(["train", "--data", str(corpus), "--run-dir", str(run_dir), "--resume"])
    assert code == 0
    # choose_checkpoint(run_dir) picks the newest verified checkpoint of the run.
    assert launched[0].resume == run_dir


def test_bare_resume_takes_the_run_dir_from_the_config_file(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "run.toml").write_text(f"run_dir = '{tmp_path / 'from-file'}'\n")
    without_a_record(monkeypatch)
    launched: list[TrainConfig] = []
    monkeypatch.setattr(cli, "_launch", lambda config, dry=False: launched.append(config) or 0)
    main(["train", "--data", str(corpus), "--config", str(tmp_path / "run.toml"), "--resume"])
    assert launched[0].resume == tmp_path / "from-file"


def test_bare_resume_without_a_run_dir_is_one_line(
    corpus: Path, capsys: pytest.CaptureFixture
) -> None:
    code, err = run_cli(["--data", str(corpus), "--resume"], capsys)
    assert_one_line_error(code, err, "--resume without a path", "--run-dir RUN_DIR")


def test_bare_resume_of_a_run_without_checkpoints_is_one_line(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, err = run_cli(["--data", str(corpus), "--run-dir", str(tmp_path), "--resume"], capsys)
    assert_one_line_error(code, err, f"--resume {tmp_path}", "no complete checkpoint")


def test_every_field_has_exactly_one_section() -> None:
    listed = [name for names in SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(TrainConfig.model_fields)


def test_help_groups_flags_by_section_with_typed_metavars(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    titles = [f"\n{title}:\n" for title in SECTIONS]
    positions = [text.index(title) for title in titles]
    assert positions == sorted(positions)
    # Each flag appears in the block of its own section.
    blocks = dict(zip(SECTIONS, text.split("\n\n")[-len(SECTIONS) :], strict=True))
    for section, names in SECTIONS.items():
        for name in names:
            assert "--" + name.replace("_", "-") in blocks[section], (section, name)
    for usage in (
        "--data PATH",
        "--model TEXT",
        "--max-steps INT",
        "--lr FLOAT",
        "--split-points NAME[,NAME...]",
        "--resume [PATH]",
        "--config PATH",
    ):
        assert usage in text


def test_help_gives_the_learning_rate_per_model_and_nnodes_as_a_range(
    capsys: pytest.CaptureFixture,
) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone
    assert "(default: 0.008 for lstm and gru, 0.003 for transformer and models of your own)" in text
    assert "(default: 0.008)" not in text
    assert "--nnodes N|MIN:MAX" in text
    assert TrainConfig(model="transformer").lr == 0.003
    assert TrainConfig(model="gru").lr == 0.008
