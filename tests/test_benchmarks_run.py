"""Every benchmark still runs: `python benchmarks/X.py --tiny` ends with its JSON line.

A benchmark nobody runs rots silently (sync_strategies.py once passed a PowerSGD flag to a run
without PowerSGD, which the CLI refuses, and printed nothing for months). --tiny goes through the
script's own path at its smallest sizes, one round and its A/A twin; its figures are no result.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SRC = Path(__file__).parents[1] / "src"
# Seconds a tiny run may take on a loaded 2-core machine (measured quiet: see the README).
TIMEOUT_S = 240
# Benchmarks that measure nothing without their peers: the packages they need.
NEEDS = {
    "peers": ("accelerate", "lightning"),
    "torchft_healing": ("torchft",),
}
SCRIPTS = sorted(
    path.stem
    for path in BENCHMARKS.glob("*.py")
    if path.stem != "device_check"  # it has --dry, run by device_check.sh --dry
)


def test_every_benchmark_script_is_covered() -> None:
    assert {"sync_strategies", "dp_overhead", "peers"} <= set(SCRIPTS)
    assert set(NEEDS) <= set(SCRIPTS)


@pytest.mark.distributed
@pytest.mark.timeout(TIMEOUT_S + 30)
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_tiny_run_ends_with_its_json_line(script: str, tmp_path: Path) -> None:
    missing = [name for name in NEEDS.get(script, ()) if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{script}.py compares against {', '.join(missing)}: not installed")
    # The project's own src/ first, as for the tests (the benchmarks start `python -m shardwise`).
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=os.environ | {"PYTHONPATH": path},
        cwd=tmp_path,
    )
    tail = f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, tail
    lines = done.stdout.strip().splitlines()
    assert lines, tail
    figures = json.loads(lines[-1])
    assert isinstance(figures, dict), tail
    assert any(_numbers(figures)), f"no number in the JSON line: {lines[-1]}"


def _numbers(value: object) -> list[float]:
    """Every int or float in a JSON value, nested ones included (not booleans)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [value]
    if isinstance(value, dict):
        return [n for item in value.values() for n in _numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return []
