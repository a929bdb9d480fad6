"""Hostile checkpoints: `shardwise train --resume` must refuse every one, and run none of them.

Each test copies one real checkpoint (trained once per module through the CLI), plants one
payload from payloads.py, reseals the manifest as an attacker would, resumes through the CLI in
a subprocess, and asserts that the payload did not run (its marker file is absent), that the
run exits 2 and that stderr is the single line `shardwise: error: ...`. The CLI is the contract;
one in-process test reads the metadata directly, because the API there is still moving.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from checkpoint import payloads
from helpers import write_corpus
from shardwise.errors import ShardwiseError

# The first test's setup trains the base checkpoint, and a test may wait for its resume behind
# others in the pool: generous, for a shared 2-core machine.
pytestmark = pytest.mark.timeout(240)

# A loader that blocks (on a FIFO, say) fails after this; a healthy resume takes ~15 s.
SUBPROCESS_TIMEOUT_S = 150
STEP = "checkpoints/step_00000002"
FLAGS = [
    "--model", "gru", "--max-len", "64", "--nproc", "1", "--batch-size", "4",
    "--batching", "fixed", "--checkpoint-every", "1", "--no-tensorboard", "--sample-bytes", "0",
]  # fmt: skip


@dataclass(frozen=True)
class Trained:
    corpus: Path
    run_dir: Path
    cache: Path  # the tokenisation cache the base run filled (one entry)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("base")
    base = Trained(write_corpus(root / "corpus.txt"), root / "run", root / "cache")
    result = run_cli(base, "--run-dir", str(base.run_dir), "--max-steps", "2", cwd=root)
    assert result.returncode == 0, result.stderr
    assert (base.run_dir / STEP).is_dir(), "the base run wrote no step-2 checkpoint"
    return base


@pytest.fixture
def run_dir(trained: Trained, tmp_path: Path) -> Path:
    """A private copy of the trained run directory, to tamper with."""
    return shutil.copytree(trained.run_dir, tmp_path / "run")


def run_cli(
    trained: Trained, *args: str, cwd: Path, cache: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m shardwise train` on the base corpus with the base flags plus `args`."""
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCHER_VARIABLES}
    env["SHARDWISE_CACHE"] = str(cache or trained.cache)
    return subprocess.run(
        [sys.executable, "-m", "shardwise", "train", "--data", str(trained.corpus), *FLAGS, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


# A test run under torchrun must not make the CLI think it is a worker itself.
_LAUNCHER_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"}


def resume(trained: Trained, run_dir: Path) -> subprocess.CompletedProcess[str]:
    # Into the same run directory: --resume is what keeps a used run directory allowed.
    args = ("--run-dir", str(run_dir), "--resume", str(run_dir / STEP), "--max-steps", "3")
    return run_cli(trained, *args, cwd=run_dir.parent)


def assert_refused(result: subprocess.CompletedProcess[str], marker: Path) -> None:
    assert not marker.exists(), f"the payload ran: {marker} exists (exit {result.returncode})"
    assert result.returncode == 2, f"exit {result.returncode}, stderr:\n{result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{result.stderr}"
    assert lines[0].startswith("shardwise: error: "), lines[0]


Payload = Callable[[Path, Path], None]

HOSTILE: list[Payload] = [
    payloads.plant_metadata_os_system,
    payloads.plant_metadata_file_io,
    payloads.plant_metadata_popen,
    payloads.plant_metadata_reduce,
    payloads.plant_shard_byte_item,
    payloads.plant_shard_tensor_pickle,
    payloads.plant_shard_fifo,
    payloads.plant_rng_pickle,
    payloads.plant_state_deep_nesting,
    payloads.plant_state_scheduler_attributes,
    payloads.plant_state_unchecked_rates,
    payloads.plant_manifest_escape,
    payloads.plant_manifest_deep_nesting,
]


def untouched(checkpoint_dir: Path, marker: Path) -> None:
    """The control: no payload, only the attacker's reseal of an unchanged checkpoint."""
    del marker
    payloads.seal(checkpoint_dir)


@dataclass(frozen=True)
class Resumed:
    result: subprocess.CompletedProcess[str]
    run_dir: Path
    marker: Path


def plant_and_resume(plant: Payload, trained: Trained, root: Path) -> Resumed:
    """Plant `plant` in a private copy of the trained run, then resume from it."""
    run_dir = shutil.copytree(trained.run_dir, root / "run")
    marker = root / "MARKER"
    plant(run_dir / STEP, marker)
    return Resumed(resume(trained, run_dir), run_dir, marker)


@pytest.fixture(scope="module")
def resumed(
    request: pytest.FixtureRequest, trained: Trained, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Payload, Future[Resumed]]]:
    """The selected resumes (each payload's, and the control's), started at once, two at a time.

    Each is a CLI process of ~7 CPU-seconds (the control's ~15), most of it importing torch and
    preparing the run before the loader refuses: two at a time halve their share of the
    module's time on two cores. Only the tests pytest selected are started, so `-k` stays cheap.
    """
    chosen = [untouched] if _selected(request, test_a_resealed_untouched_checkpoint_resumes) else []
    chosen += [
        item.callspec.params["plant"]
        for item in _selected(request, test_resume_refuses_a_hostile_checkpoint)
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {
            plant: pool.submit(
                plant_and_resume, plant, trained, tmp_path_factory.mktemp(plant.__name__)
            )
            for plant in chosen
        }
        pool.shutdown(cancel_futures=True)


def _selected(request: pytest.FixtureRequest, test: Callable) -> list[pytest.Item]:
    return [item for item in request.session.items if getattr(item, "function", None) is test]


@pytest.mark.parametrize("plant", HOSTILE, ids=lambda plant: plant.__name__.removeprefix("plant_"))
def test_resume_refuses_a_hostile_checkpoint(
    plant: Payload, resumed: dict[Payload, Future[Resumed]]
) -> None:
    outcome = resumed[plant].result()
    assert_refused(outcome.result, outcome.marker)


def test_a_resealed_untouched_checkpoint_resumes(resumed: dict[Payload, Future[Resumed]]) -> None:
    # Without this, a loader that refused everything (or a `seal` the loader disagreed with)
    # would pass every test above.
    outcome = resumed[untouched].result()
    assert outcome.result.returncode == 0, outcome.result.stderr
    assert (outcome.run_dir / "checkpoints" / "step_00000003").is_dir()


METADATA_CHAINS: list[Payload] = [
    payloads.plant_metadata_os_system,
    payloads.plant_metadata_file_io,
    payloads.plant_metadata_popen,
    payloads.plant_metadata_reduce,
]


@pytest.mark.parametrize(
    "plant", METADATA_CHAINS, ids=lambda plant: plant.__name__.removeprefix("plant_")
)
def test_metadata_reader_refuses_in_process(
    plant: Payload, trained: Trained, run_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    plant(run_dir / STEP, marker)
    refusal = None
    try:
        metadata_reader()(run_dir / STEP)
    except ShardwiseError as exc:
        refusal = exc
    assert not marker.exists(), "the payload ran inside the test process"
    assert refusal is not None, "the metadata reader accepted a hostile .metadata"


def metadata_reader() -> Callable[[Path], object]:
    """Whichever restricted metadata reader this version of shardwise has (the API is moving)."""
    for module, name in _METADATA_READERS:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ModuleNotFoundError:
            continue
        if found is not None:
            return found
    pytest.skip("no restricted metadata reader found in shardwise.checkpoint")


_METADATA_READERS = [
    ("shardwise.checkpoint.metadata", "read_metadata"),
    ("shardwise.checkpoint", "read_metadata"),
    ("shardwise.checkpoint", "check_metadata"),
]


def test_a_poisoned_tokenisation_cache_entry_runs_nothing(trained: Trained, tmp_path: Path) -> None:
    cache = shutil.copytree(trained.cache, tmp_path / "cache")
    # The entry the base run wrote is the one this corpus and these flags look up: no need to
    # recompute its key here (and no risk of planting at a path nothing reads).
    (entry,) = cache.glob("corpus-*.npz")
    marker = tmp_path / "MARKER"
    payloads.plant_cache_object_arrays(entry, marker)
    # --dry-run reads the corpus through the same cache as training does, in seconds.
    result = run_cli(
        trained, "--dry-run", "--run-dir", str(tmp_path / "run"), cwd=tmp_path, cache=cache
    )
    assert not marker.exists(), f"the payload ran: {marker} exists (exit {result.returncode})"
    if result.returncode == 0:  # a miss: the entry is rebuilt, which proves it was consulted
        with np.load(entry, allow_pickle=False) as rebuilt:
            assert all(rebuilt[name].dtype != object for name in rebuilt.files)
    else:
        assert_refused(result, marker)
