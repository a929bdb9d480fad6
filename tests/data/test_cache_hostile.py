"""The tokenisation cache under attack: an entry that is not what --data reads is never used.

Each test puts something in the cache where prepare_corpus will look (an entry with other
tokens, another corpus's entry, an out-of-range id the entry's note hides, a pipe, a link, a
file of another user) and checks that the run gets the corpus's own tokens anyway.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from shardwise.data.cache import cache_key, load_sequences, save_sequences
from shardwise.data.corpus import read_source
from shardwise.data.prepare import PreparedCorpus, prepare_corpus

SETTINGS = {"max_len": 16, "long_sequences": "split", "eval_fraction": 0.1, "seed": 0}


def write_jsonl(path: Path, sequences: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"tokens": ids}) + "\n" for ids in sequences))
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Ids up to 299: an inferred vocabulary of 300."""
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 299, size=int(rng.integers(3, 20))).tolist() for _ in range(40)]
    rows[0].append(299)
    return write_jsonl(tmp_path / "data.jsonl", rows)


def prepared(path: Path, cache: Path | None) -> PreparedCorpus:
    return prepare_corpus(path, **SETTINGS, cache_dir=cache)


def only_entry(cache: Path) -> Path:
    (entry,) = cache.glob("corpus-*.npz")
    return entry


@pytest.fixture
def cache(data: Path, tmp_path: Path) -> Path:
    """A cache holding the data's good entry."""
    prepared(data, tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture
def other_entry(tmp_path: Path) -> Path:
    """A good entry of another corpus, in a cache of its own."""
    other = write_jsonl(tmp_path / "other.jsonl", [[1, 2, 3, 4]] * 40)
    prepared(other, tmp_path / "other-cache")
    return only_entry(tmp_path / "other-cache")


def edit_tokens(entry: Path, first: int | None = None, every: int | None = None) -> None:
    """Change the entry's training tokens in place, as an editor of the file would; the note
    and the digest stay as they were."""
    with np.load(entry) as stored:
        arrays = {name: stored[name].copy() for name in stored.files}
    tokens = arrays["train.tokens"]
    if every is not None:
        tokens[:] = every
    if first is not None:
        tokens[0] = first
    np.savez(entry, **arrays)


def as_lists(corpus: PreparedCorpus) -> tuple[list[list[int]], list[list[int]], int]:
    return (
        [s.tolist() for s in corpus.train],
        [s.tolist() for s in corpus.eval],
        corpus.vocab_size,
    )


def assert_is_the_data(corpus: PreparedCorpus, data: Path) -> None:
    assert as_lists(corpus) == as_lists(prepared(data, None))
    assert corpus.largest_id == 299


@pytest.mark.timeout(30)
def test_an_entry_holding_other_tokens_is_rebuilt(data: Path, cache: Path) -> None:
    # Before: the run trained on the entry's tokens, not on --data's.
    edit_tokens(only_entry(cache), every=7)
    assert_is_the_data(prepared(data, cache), data)


@pytest.mark.timeout(30)
def test_another_corpuss_entry_under_this_name_is_rebuilt(
    data: Path, cache: Path, other_entry: Path
) -> None:
    # Before: a good entry of another corpus, copied to this corpus's name, was used.
    shutil.copyfile(other_entry, only_entry(cache))
    assert_is_the_data(prepared(data, cache), data)


@pytest.mark.timeout(30)
def test_an_id_the_entrys_note_hides_is_not_trusted(data: Path, cache: Path) -> None:
    # Before: the note's largest_id (299) passed the vocabulary check, and id 10**6 reached
    # the embedding in every worker (IndexError mid-run).
    edit_tokens(only_entry(cache), first=10**6)
    corpus = prepared(data, cache)
    assert max(int(s.max()) for s in corpus.train if len(s)) < corpus.vocab_size
    assert_is_the_data(corpus, data)


@pytest.mark.timeout(30)
def test_a_pipe_as_an_entry_is_not_waited_on(data: Path, cache: Path) -> None:
    # Before: np.load opened the FIFO and waited for a writer forever.
    entry = only_entry(cache)
    entry.unlink()
    os.mkfifo(entry)
    assert_is_the_data(prepared(data, cache), data)
    assert entry.is_file()  # rebuilt in its place


@pytest.mark.timeout(30)
def test_a_link_as_an_entry_is_not_followed(data: Path, cache: Path, other_entry: Path) -> None:
    # Before: a link to another corpus's entry was followed and used.
    entry = only_entry(cache)
    entry.unlink()
    entry.symlink_to(other_entry)
    assert_is_the_data(prepared(data, cache), data)


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a file of another user")
def test_an_entry_of_another_user_is_not_used(data: Path, cache: Path) -> None:
    # Before: used, whoever wrote it.
    entry = only_entry(cache)
    edit_tokens(entry, first=7)
    os.chown(entry, 12345, 12345)
    assert_is_the_data(prepared(data, cache), data)


@pytest.mark.timeout(30)
def test_an_entry_others_may_write_is_not_used(data: Path, cache: Path) -> None:
    entry = only_entry(cache)
    made_from = cache_key(read_source(data).digest, **SETTINGS)
    entry.chmod(0o666)
    assert load_sequences(entry, made_from) is None
    assert_is_the_data(prepared(data, cache), data)


@pytest.mark.timeout(30)
def test_an_entry_whose_digest_holds_but_whose_ids_pass_its_note_is_rebuilt(
    data: Path, cache: Path
) -> None:
    # Written through the cache's own writer, digest and all: the ids are still checked.
    entry = only_entry(cache)
    made_from = cache_key(read_source(data).digest, **SETTINGS)
    groups, meta = load_sequences(entry, made_from)
    groups["train"][0] = groups["train"][0].copy()
    groups["train"][0][0] = 10**6
    save_sequences(entry, groups, meta, made_from)
    assert load_sequences(entry, made_from) is not None  # the digest holds
    assert_is_the_data(prepared(data, cache), data)


@pytest.mark.timeout(30)
def test_a_good_entry_is_still_a_hit(
    data: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardwise.data import prepare

    first = prepared(data, None)

    def no_tokenising(*args: object) -> None:
        raise AssertionError("the corpus was tokenised again")

    monkeypatch.setattr(prepare, "_prepare", no_tokenising)
    assert as_lists(prepared(data, cache)) == as_lists(first)
