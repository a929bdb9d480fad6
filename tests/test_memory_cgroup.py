"""Under a real memory cap (a cgroup of its own), plain data-parallel training of a model too big
for it is refused by the prediction (or killed by the cap), and `--shard full` trains it to the
end within the cap. Needs root and a writable memory cgroup (v2 or v1); skipped otherwise.

The sharded run's workers hold glibc's mmap threshold at its initial 128 KiB by themselves
(memory/measure.py `hand_back_large_frees`; the test sets nothing): with glibc's default dynamic
threshold, each large tensor freed raises it, later ones come from a heap that fragments, and on
CPU a sharded model's per-step gathers and frees grew the resident memory step after step past
an unsharded one's (measured: 916-998 MiB above baseline against DDP's 806-852, for a prediction
of 419), so no cap between them held. With the threshold fixed, freed tensors go back to the
system and the resident memory follows the tensors the prediction counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import write_corpus
from shardwise.memory.sizes import format_size
from shardwise.techniques import settings

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

# A Transformer whose AdamW state alone is ~0.7 GB: two data-parallel replicas cannot share a
# 2.5 GiB cap with their processes, while two halves of one sharded copy can.
FACTORY = """
    from shardwise.models import TransformerLM

    def big(vocab_size=256):
        return TransformerLM(vocab_size=vocab_size, dim=768, num_layers=6, num_heads=12, max_len=64)
"""
CAP = int(2.5 * 2**30)
FLAGS = (
    "--model capped_model:big --max-len 64 --batching fixed --batch-size 2 --nproc 2 "
    "--max-steps 2 --log-every 1 --sample-bytes 0 --no-tensorboard --max-restarts 0 "
    "--checkpoint-every 0 --eval-fraction 0.02"
)


def memory_cgroup() -> tuple[Path, str]:
    """(the folder of this process's memory cgroup, its limit file); skips where none can be
    made below it."""
    if os.geteuid() != 0:
        pytest.skip("capping memory needs root (a cgroup of the test's own)")
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        v2 = number == "0" and not controllers
        if not v2 and "memory" not in controllers.split(","):
            continue
        for mount in mounts:
            fields = mount.split()
            kind, options = fields[fields.index("-") + 1], fields[-1]
            v1_memory = kind == "cgroup" and "memory" in options.split(",")
            if (v2 and kind == "cgroup2") or (not v2 and v1_memory):
                folder = Path(fields[4]) / Path(path).relative_to(fields[3])
                if v2 and "memory" not in (folder / "cgroup.subtree_control").read_text():
                    continue  # v2 cannot cap a child here without moving this process first
                if os.access(folder, os.W_OK):
                    return folder, "memory.max" if v2 else "memory.limit_in_bytes"
    pytest.skip("no writable memory cgroup (v2 with memory delegated, or v1) for this process")


@contextlib.contextmanager
def capped(limit: int) -> Iterator[Path]:
    """A child memory cgroup limited to `limit` bytes; its cgroup.procs to join."""
    parent, name = memory_cgroup()
    child = parent / f"shardwise-test-{os.getpid()}"
    child.mkdir()
    try:
        (child / name).write_text(str(limit))
        yield child / "cgroup.procs"
    finally:
        for _ in range(50):  # the workers' last exits
            with contextlib.suppress(OSError):
                child.rmdir()
                break
            time.sleep(0.2)


def train_under(procs: Path, extra: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """`shardwise train` started inside the capped cgroup (its workers join it with it)."""
    command = f"echo $$ > {shlex.quote(str(procs))} && exec {shlex.quote(sys.executable)} "
    command += f"-m shardwise train {FLAGS} {extra}"
    return subprocess.run(
        ["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=800
    )


def test_sharding_trains_under_a_cap_that_plain_data_parallel_cannot_fit(tmp_path: Path) -> None:
    if "shard" not in settings():
        pytest.skip("the sharding technique (--shard) is not registered yet")
    (tmp_path / "capped_model.py").write_text(textwrap.dedent(FACTORY))
    data = write_corpus(tmp_path / "corpus.txt", paragraphs=400)
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # the run's own workers set it (module docstring)
    with capped(CAP) as procs:
        plain = train_under(procs, f"--data {data} --run-dir {tmp_path / 'plain'}", tmp_path, env)
        sharded = train_under(
            procs, f"--data {data} --run-dir {tmp_path / 'sharded'} --shard full", tmp_path, env
        )
    said = plain.stderr.strip().splitlines()
    refused = said and "is over the memory budget of" in said[-1]
    killed = plain.returncode != 0 and any("SIGKILL" in line or "Killed" in line for line in said)
    assert plain.returncode != 0 and (refused or killed), plain.stderr[-2000:]
    if refused:  # before any worker, naming the cap and changes that fit under it
        assert "memory.limit_in_bytes" in said[-1] or "memory.max" in said[-1], said[-1]
        assert "changes that fit on the same devices: --" in said[-1], said[-1]
        assert not (tmp_path / "plain").exists()
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    summary = json.loads((tmp_path / "sharded" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["memory"]["mmap_threshold"] == 128 * 1024
    peaks = [rank["peak_bytes"] for rank in summary["memory"]["ranks"]]
    assert sum(peaks) < CAP, f"the ranks' peaks {[format_size(p) for p in peaks]} are over the cap"
