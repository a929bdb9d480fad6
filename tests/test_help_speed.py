"""`shardwise train --help` and `--version` answer without importing torch (2 s of a 2.7 s wait)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

PROBE = """
import sys
from shardwise.cli import main
for argv in (["train", "--help"], ["--version"]):
    try:
        main(argv)
    except SystemExit:
        pass
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def test_help_and_version_import_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert "--max-steps" in done.stdout and "shardwise 0." in done.stdout
    assert done.stderr.strip().endswith("torch imported: False"), done.stderr
