"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_corpus


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture(autouse=True)
def private_corpus_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Keep the tokenisation cache out of the user's home (workers inherit the variable)."""
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
