"""Rules that depend on the config alone refuse a run in the launcher, before any worker starts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardwise.config import build_config
from shardwise.errors import ShardwiseError

FP16_WITH_MODEL_PARALLEL = "--precision fp16 is not supported with --pp or --tp above 1"
TOO_FEW_MICROBATCHES = "--schedule 1f1b needs at least as many micro-batches as stages"


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
        {"tp": 2, "microbatches": 1},
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
    ],
    ids=["1f1b", "fp16"],
)
def test_the_real_command_refuses_at_once_without_starting_a_worker(
    tmp_path: Path, flags: str, message: str
) -> None:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "shardwise", "train", *flags.split()],
        cwd=tmp_path,  # the default run dir would be tmp_path/runs/<timestamp>
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardwise: error: "), result.stderr
    assert message in lines[0] and result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no runs/ dir, no worker log, nothing written
    # Importing torch is most of this; a worker start (rendezvous, data, profiling) is not.
    assert elapsed < 20, f"took {elapsed:.1f}s"
