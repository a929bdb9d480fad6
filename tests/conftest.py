"""Shared fixtures, and the `distributed` marker on every multi-process test.

    pytest -m "not distributed"   # the fast, single-process tests only

Everything under tests/distributed/ is marked here; a multi-process test elsewhere carries the
marker itself (`pytestmark = pytest.mark.distributed` or a decorator).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from helpers import write_corpus
from shardwise.signed_store import SECRET_ENV

# The "nodes" of a test's multi-node job share one secret, as real nodes must (README: What is
# trusted). tests/test_store_attacks.py takes it away to attack a launcher's own fresh secret.
os.environ.setdefault(SECRET_ENV, secrets.token_hex(32))

DISTRIBUTED_TESTS = Path(__file__).parent / "distributed"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(DISTRIBUTED_TESTS):
            item.add_marker(pytest.mark.distributed)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as if no SLURM step held us: the suite run inside `srun` must not take its nodes."""
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def private_corpus_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Keep the tokenisation cache out of the user's home (workers inherit the variable)."""
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
