"""`--dry-run` says what the run will do, and prints no step time it cannot stand behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shardwise.cli import main

pytestmark = pytest.mark.timeout(120)


def dry_run(capsys: pytest.CaptureFixture, *flags: str) -> str:
    assert main(["train", "--dry-run", *flags]) == 0
    return capsys.readouterr().out


def test_it_names_model_steps_batches_schedule_and_run_dir(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = dry_run(
        capsys,
        *("--data", str(corpus), "--model", "gru", "--nproc", "2", "--pp", "2"),
        *("--max-steps", "40", "--tokens-per-batch", "1024", "--grad-accum", "2"),
        *("--lr", "1e-3", "--warmup-steps", "5", "--run-dir", str(tmp_path / "run")),
    )
    assert re.search(r"model: gru, [\d,]+ parameters; data: .*corpus.txt", out), out
    assert "steps: 40; batch: 1,024 token slots a rank x 2 accumulated" in out, out
    assert "learning rate: 0.001 peak after 5 warmup steps, cosine to 0.0001 at step 40" in out
    assert f"run dir: {tmp_path / 'run'}" in out
    assert " ms" not in out and "predicted step time" not in out  # 12-22x off when it was
    assert not (tmp_path / "run").exists()


def test_a_tensor_parallel_dry_run_does_not_say_every_rank_holds_the_whole_model(
    corpus: Path, capsys: pytest.CaptureFixture
) -> None:
    out = dry_run(capsys, "--data", str(corpus), "--model", "transformer", "--tp", "2")
    assert "holds the whole model" not in out
    assert "its large layers split 2 ways" in out and "column-wise" in out


def test_processes_a_technique_starts_beside_the_workers_are_said(
    capsys: pytest.CaptureFixture, corpus: Path
) -> None:
    out = dry_run(capsys, "--data", str(corpus), "--sync", "async", "--ps", "1", "--nproc", "2")
    assert (
        "plus 1 parameter server(s) holding the parameters and optimizer state (--sync async)"
        in (out)
    )
