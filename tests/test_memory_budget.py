"""The memory budget: where its default comes from, and a run predicted over it refused in the
launcher, in one line naming the peak, the budget and changes that fit, before any worker."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_corpus
from shardwise.memory.budget import MemoryBudget, OverBudget, machine_memory, refusal
from shardwise.memory.sizes import parse_size
from test_early_rules import assert_refused_at_once

MIB = 2**20


def fake_proc(tmp_path: Path, cgroup: str, mountinfo: str, meminfo_kb: int = 8_000_000) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    (proc / "meminfo").write_text(f"MemTotal:       {meminfo_kb} kB\nMemFree: 1 kB\n")
    return proc


V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
V1_MOUNT = "31 23 0:27 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"


def test_the_default_is_the_tightest_cgroup_v2_limit_over_the_process(tmp_path: Path) -> None:
    root = tmp_path / "root"
    job = root / "sys/fs/cgroup/jobs/one"
    job.mkdir(parents=True)
    (job / "memory.max").write_text("max\n")  # the job's own: unlimited
    (job.parent / "memory.max").write_text(f"{3 * 2**30}\n")  # its parent's: 3 GiB
    proc = fake_proc(tmp_path, "0::/jobs/one\n", V2_MOUNT)
    limit, source = machine_memory(proc, root)
    assert limit == 3 * 2**30
    assert "memory.max" in source and "/sys/fs/cgroup/jobs" in source


def test_the_default_reads_cgroup_v1_and_falls_back_to_memtotal(tmp_path: Path) -> None:
    root = tmp_path / "root"
    group = root / "sys/fs/cgroup/memory/batch"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{512 * MIB}\n")
    proc = fake_proc(tmp_path, "4:memory:/batch\n0::/\n", V1_MOUNT)
    assert machine_memory(proc, root) == (
        512 * MIB,
        "cgroup memory.limit_in_bytes of /sys/fs/cgroup/memory/batch",
    )
    (group / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert machine_memory(proc, root) == (8_000_000 * 1024, "MemTotal in /proc/meminfo")


def test_sizes_read_as_people_write_them() -> None:
    assert parse_size("6GiB") == 6 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size(" 1.5 gib ") == 3 * 2**29
    assert parse_size("4096") == parse_size(4096) == 4096
    for wrong in ("6XB", "-1G", "G", "", True):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(wrong)


def test_the_refusal_is_one_line_with_every_fitting_change_and_its_peak() -> None:
    line = refusal(
        OverBudget(5 * 2**30, "rank 0 (worst batch 16 x 1023 at step 37)"),
        MemoryBudget(4 * 2**30, "--memory-budget 4.00 GiB"),
        [("--pp 2", 3 * 2**30), ("--shard full --pp 2", 2 * 2**30)],
    )
    assert "\n" not in line
    assert line.startswith("predicted peak 5.00 GiB on rank 0 (worst batch 16 x 1023 at step 37)")
    assert "over the memory budget of 4.00 GiB a rank (--memory-budget 4.00 GiB)" in line
    assert "--pp 2 (predicted 3.00 GiB), --shard full --pp 2 (predicted 2.00 GiB)" in line


# A Transformer with enough activations that another layout or setting fits well below them.
FLAGS = "--model transformer --max-len 64 --batching fixed --batch-size 48 --nproc 2 --max-steps 5"


def dry_run(data: Path, cwd: Path) -> tuple[int, int]:
    """(rank 0's predicted peak, its activations) in bytes, as --dry-run prints them."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardwise",
            "train",
            "--data",
            str(data),
            *FLAGS.split(),
            "--dry-run",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert re.search(r"^memory budget: .*; fits, at [\d.]+ (MiB|GiB)$", done.stdout, re.MULTILINE)
    line = next(line for line in done.stdout.splitlines() if line.strip().startswith("rank 0:"))
    total = re.search(r"rank 0: ([\d.]+) MiB =", line)
    activations = re.search(r"activations ([\d.]+) MiB", line)
    assert total and activations, line
    return round(float(total[1]) * MIB), round(float(activations[1]) * MIB)


@pytest.mark.timeout(240)
def test_a_run_predicted_over_its_budget_is_refused_naming_changes_that_fit(
    tmp_path: Path,
) -> None:
    data = write_corpus(tmp_path / "corpus.txt")
    peak, activations = dry_run(data, tmp_path)
    assert activations > 20 * MIB  # enough for a change to fit well within the budget
    budget = peak - activations // 2  # far below the peak, whatever a launcher's baseline
    work = tmp_path / "work"
    work.mkdir()
    flags = ["--data", str(data), *FLAGS.split(), "--memory-budget", str(budget)]
    line = assert_refused_at_once(flags, work, "is over the memory budget of")
    assert re.search(
        r"predicted peak [\d.]+ MiB on rank \d \(worst batch \d+ x \d+ at step \d+\)", line
    )
    fits = re.findall(r"(--[a-z-]+ [\w-]+(?: --[a-z-]+ [\w-]+)*) \(predicted ([\d.]+) MiB\)", line)
    assert fits, line
    assert all(float(mib) * MIB <= budget for _, mib in fits), line


@pytest.mark.timeout(120)
def test_a_budget_no_change_can_meet_says_so(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "corpus.txt")
    work = tmp_path / "work"
    work.mkdir()
    flags = ["--data", str(data), *FLAGS.split(), "--memory-budget", "1MiB"]
    line = assert_refused_at_once(flags, work, "over the memory budget of 1.0 MiB a rank")
    assert "no setting of a technique, nor another --pp or --tp on the same devices, fits" in line
