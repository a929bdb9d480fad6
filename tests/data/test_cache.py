"""The tokenisation cache: exact round trips, atomic writes, keys that never go stale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardwise.data import prepare
from shardwise.data.cache import cache_path, default_cache_dir, load_sequences, save_sequences
from shardwise.data.prepare import prepare_corpus


def test_sequences_and_meta_come_back_exactly(tmp_path: Path) -> None:
    train = [np.array([1, 2, 3], dtype=np.uint8), np.array([4], dtype=np.uint8)]
    path = tmp_path / "entry.npz"
    save_sequences(path, {"train": train, "eval": []}, {"vocab_size": 256, "note": "x"})
    groups, meta = load_sequences(path)
    assert [s.tolist() for s in groups["train"]] == [[1, 2, 3], [4]]
    assert groups["train"][0].dtype == np.uint8
    assert groups["eval"] == []
    assert meta == {"vocab_size": 256, "note": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["entry.npz"]  # no temporary left behind


def test_a_missing_or_damaged_entry_is_a_miss(tmp_path: Path) -> None:
    assert load_sequences(tmp_path / "absent.npz") is None
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert load_sequences(tmp_path / "torn.npz") is None


def test_keys_change_with_the_corpus_and_every_setting(tmp_path: Path) -> None:
    base = cache_path("abc", tmp_path, max_len=256, policy="split")
    assert base == cache_path("abc", tmp_path, policy="split", max_len=256)
    assert base != cache_path("abd", tmp_path, max_len=256, policy="split")
    assert base != cache_path("abc", tmp_path, max_len=128, policy="split")
    assert base != cache_path("abc", tmp_path, max_len=256, policy="truncate")


def test_the_cache_directory_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("SHARDWISE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "shardwise"


def test_a_second_prepare_reads_the_cache_instead_of_the_corpus(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = prepare_corpus(corpus, 32, "split", 0.1, seed=0, cache_dir=tmp_path)

    def no_reading(path: object) -> None:
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(prepare, "read_sequences", no_reading)
    second = prepare_corpus(corpus, 32, "split", 0.1, seed=0, cache_dir=tmp_path)
    assert [s.tolist() for s in second.train] == [s.tolist() for s in first.train]
    assert [s.tolist() for s in second.eval] == [s.tolist() for s in first.eval]
    assert (second.vocab_size, second.fit) == (first.vocab_size, first.fit)


def test_an_unwritable_cache_does_not_stop_the_run(corpus: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    prepared = prepare_corpus(corpus, 32, "split", 0.1, seed=0, cache_dir=blocked / "cache")
    assert prepared.train
