"""A run continues as itself: `--resume RUN` takes the run's own settings, its config.toml
reruns it from anywhere, and a path from a file or a record says where it came from."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import reseal, write_corpus
from shardwise.checkpoint import STATE_FILE
from shardwise.cli import main
from shardwise.config import Record, TrainConfig, load_config
from shardwise.errors import ShardwiseError
from train_cli import assert_identical_weights

# The run's own settings, every one away from its default, given once at its start only.
FLAGS = [
    *("--model", "gru", "--data", "notes.txt", "--lr", "2e-3", "--tokens-per-batch", "512"),
    *("--checkpoint-every", "2", "--max-len", "64", "--nproc", "1", "--device", "cpu"),
    *("--no-tensorboard", "--sample-bytes", "0", "--log-every", "1", "--eval-tokens", "500"),
]


def shardwise_train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "shardwise", "train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`full`: 6 steps at once; `resumed`: 2 steps, then `--resume` from another directory."""
    root = tmp_path_factory.mktemp("runs")
    (root / "project").mkdir()
    (root / "elsewhere").mkdir()
    write_corpus(root / "project" / "notes.txt")
    shardwise_train(root / "project", *FLAGS, "--max-steps", "6", "--run-dir", "full")
    shardwise_train(root / "project", *FLAGS, "--max-steps", "2", "--run-dir", "resumed")
    later = shardwise_train(
        root / "elsewhere", "--resume", "../project/resumed", "--max-steps", "6"
    )
    (root / "resumed.err").write_text(later.stderr + later.stdout)
    return root


@pytest.mark.timeout(300)
def test_resume_alone_continues_with_every_setting_of_the_run(runs: Path) -> None:
    project = runs / "project"
    # Bit for bit the uninterrupted run: model, lr, data and token budget were the run's own.
    assert_identical_weights(project / "full", project / "resumed")
    # --checkpoint-every 2 went on after the resume, rather than reverting to 0.
    checkpoints = sorted(path.name for path in (project / "resumed" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002", "step_00000004", "step_00000006"]
    # The one change given is the one listed.
    notes = json.loads((project / "resumed" / "summary.json").read_text())["resume_notes"]
    assert notes == ["max_steps: 2 -> 6 (the cosine decay now ends at step 6)"]
    assert "max_steps: 2 -> 6" in (runs / "resumed.err").read_text()


@pytest.mark.timeout(300)
def test_config_toml_reruns_the_run_from_another_directory(runs: Path) -> None:
    recorded = runs / "project" / "full" / "config.toml"
    settings = tomllib.loads(recorded.read_text())
    assert "run_dir" not in settings and "resume" not in settings
    assert settings["data"] == str(runs / "project" / "notes.txt")
    shardwise_train(runs / "elsewhere", "--config", str(recorded), "--run-dir", "again")
    assert_identical_weights(runs / "project" / "full", runs / "elsewhere" / "again")


@pytest.mark.timeout(60)
def test_resume_of_checkpoints_without_settings_is_one_line(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    shutil.copytree(runs / "project" / "resumed" / "checkpoints" / "step_00000002", checkpoint)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    (checkpoint / STATE_FILE).write_text(json.dumps({**state, "config": {}}))
    reseal(checkpoint)

    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"shardwise: error: --resume {tmp_path / 'run'}: no checkpoint there records the run's "
        "settings (step_00000002: it records no run settings (not written by a run)); resume "
        "from a checkpoint the run wrote, or start a new run"
    )


def test_resume_of_a_directory_that_does_not_exist_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"shardwise: error: --resume {tmp_path / 'nope'}: no such directory")
    assert len(err.splitlines()) == 1


def test_a_record_gives_every_setting_the_flags_do_not(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "notes.txt")
    saved = TrainConfig(data=data, model="gru", lr=1e-3, tokens_per_batch=1024, max_steps=10)
    config = load_config(None, {"max_steps": 20}, Record("--resume r", saved.settings()))
    assert config == saved.model_copy(update={"max_steps": 20})
    # A budget given now replaces the record's, rather than being refused as a second one.
    config = load_config(None, {"max_tokens": 5000}, Record("--resume r", saved.settings()))
    assert (config.max_tokens, config.lr) == (5000, 1e-3)


def test_a_path_from_a_file_or_a_record_says_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "run.toml").write_text('data = "notes.txt"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardwiseError) as refused:
        load_config(Path("a/run.toml"))
    assert str(refused.value) == (
        f"--config a/run.toml: data 'notes.txt' (relative to the working directory {tmp_path}): "
        "file not found"
    )
    with pytest.raises(ShardwiseError) as refused:
        load_config(None, {}, Record("--resume runs/a", {"data": "notes.txt"}))
    assert str(refused.value) == (
        f"--resume runs/a: data 'notes.txt' (relative to the working directory {tmp_path}): "
        "file not found; give --data PATH"
    )


def test_a_run_dir_given_now_wins_over_the_config_files(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    used = tmp_path / "used"  # the file's run dir holds a run: alone it is refused
    (used / "checkpoints").mkdir(parents=True)
    data = write_corpus(tmp_path / "notes.txt")
    (tmp_path / "run.toml").write_text(f"run_dir = '{used}'\ndata = '{data}'\n")
    arguments = ["train", "--config", str(tmp_path / "run.toml"), "--dry-run"]
    assert main(arguments) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*arguments, "--run-dir", str(tmp_path / "new")]) == 0


@pytest.mark.timeout(300)
def test_resuming_a_finished_run_trains_nothing_and_keeps_its_report(
    runs: Path, tmp_path: Path
) -> None:
    run = tmp_path / "full"
    shutil.copytree(runs / "project" / "full", run)
    kept = {name: (run / name).read_bytes() for name in ("summary.json", "report.md")}
    kept["metrics.jsonl"] = (run / "metrics.jsonl").read_bytes()
    done = shardwise_train(tmp_path, "--run-dir", "full", "--resume")
    assert done.stdout.splitlines()[-1] == (
        "shardwise: run dir full: it already trained 6 steps, all of --max-steps 6; nothing to "
        "train, its summary.json and report are kept (raise --max-steps to train further)"
    )
    assert {name: (run / name).read_bytes() for name in kept} == kept
    # Into another run dir there is no report of its own to keep: one line says what to raise.
    elsewhere = subprocess.run(
        [sys.executable, "-m", "shardwise", "train", "--resume", "full", "--run-dir", "other"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert elsewhere.returncode == 2
    assert elsewhere.stderr.splitlines()[-1] == (
        "shardwise: error: --resume full: that run already trained 6 steps, all of "
        "--max-steps 6; raise --max-steps to train further"
    )
    assert not (tmp_path / "other" / "summary.json").exists()
