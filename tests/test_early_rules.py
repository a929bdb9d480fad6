"""Rules that depend on the config alone refuse a run in the launcher, before any worker starts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardwise.config import build_config
from shardwise.errors import ShardwiseError

FP16_WITH_MODEL_PARALLEL = "--precision fp16 is not supported with --pp or --tp above 1"
TOO_FEW_MICROBATCHES = "--schedule 1f1b needs at least as many micro-batches as stages"
BATCH_SIZE_UNDER_TOKENS = "--batch-size 32 has no effect with --batching tokens (the default)"


@pytest.mark.parametrize("degrees", [{"pp": 2}, {"tp": 2}], ids=["pp2", "tp2"])
def test_fp16_with_a_model_split_over_ranks_is_refused_by_the_config(degrees: dict) -> None:
    with pytest.raises(ShardwiseError, match="use --precision bf16"):
        build_config({"precision": "fp16", "microbatches": 2, **degrees})


def test_1f1b_with_fewer_micro_batches_than_stages_is_refused_by_the_config() -> None:
    with pytest.raises(ShardwiseError, match="raise --microbatches to 4 or use --schedule gpipe"):
        build_config({"pp": 4, "microbatches": 2})


@pytest.mark.parametrize(
    "values",
    [
        {"precision": "fp16"},
        {"precision": "bf16", "pp": 2, "tp": 2},
        {"pp": 4, "microbatches": 4},
        {"pp": 4, "microbatches": 2, "schedule": "gpipe"},
        {"pp": 2, "tp": 2, "microbatches": 2},
    ],
    ids=["fp16 data parallel", "bf16 pp2 tp2", "1f1b enough", "gpipe few", "tp only"],
)
def test_allowed_combinations_pass(values: dict) -> None:
    build_config(values)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--pp 4 --microbatches 2 --nproc 4", TOO_FEW_MICROBATCHES),
        ("--pp 2 --precision fp16 --nproc 2", FP16_WITH_MODEL_PARALLEL),
        ("--batch-size 32 --nproc 2", BATCH_SIZE_UNDER_TOKENS),
    ],
    ids=["1f1b", "fp16", "batch size"],
)
def test_the_real_command_refuses_at_once_without_starting_a_worker(
    tmp_path: Path, flags: str, message: str
) -> None:
    assert_refused_at_once(flags.split(), tmp_path, message)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("ids", "flags", "message"),
    [
        ([300], "--vocab-size 256", ":3: token id 300 is outside the vocabulary of 256"),
        ([10**12], "", ":3: token id 1000000000000 is beyond the largest vocabulary"),
        ([100_000], "", ":3: token id 100000 would make a vocabulary of 100001"),
    ],
    ids=["above --vocab-size", "1e12", "one huge id"],
)
def test_a_token_id_outside_the_vocabulary_is_refused_before_any_worker_starts(
    tmp_path: Path, ids: list[int], flags: str, message: str
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"tokens": [1, 2, 3]}\n\n' + json.dumps({"tokens": [4, *ids]}) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    command = ["--data", str(data), "--nproc", "2", *flags.split()]
    assert_refused_at_once(command, work, f"{data}{message}")


def assert_refused_at_once(flags: list[str], cwd: Path, message: str) -> str:
    """`shardwise train FLAGS` in `cwd` exits 2 with `message` in one line, writing nothing;
    that line."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "shardwise", "train", *flags],
        cwd=cwd,  # the default run dir would be cwd/runs/<timestamp>
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardwise: error: "), result.stderr
    # stdout holds at most the launcher's start line, which precedes the checks: no progress.
    said = result.stdout.strip().splitlines()
    assert message in lines[0] and all(line.startswith("shardwise: run dir ") for line in said)
    assert len(said) <= 1, result.stdout
    assert list(cwd.iterdir()) == []  # no runs/ dir, no worker log, nothing written
    # Importing torch is most of this; a worker start (rendezvous, data, profiling) is not.
    assert elapsed < 20, f"took {elapsed:.1f}s"
    return lines[0]
