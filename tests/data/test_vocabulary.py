"""A run's vocabulary: --vocab-size or inferred from the ids, and every id checked against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import quick_config
from shardwise.data import vocabulary
from shardwise.data.cache import default_cache_dir
from shardwise.data.prepare import prepare_corpus
from shardwise.data.vocabulary import check_token_ids
from shardwise.errors import ShardwiseError
from shardwise.train.build import load_corpus, seeded_model


def write_jsonl(path: Path, lines: list[object | None]) -> Path:
    """One JSON line per item; None is a blank line (read_sequences skips those)."""
    path.write_text("".join("\n" if x is None else json.dumps(x) + "\n" for x in lines))
    return path


def tokens(*ids: int) -> dict:
    return {"tokens": list(ids)}


def prepared(path: Path | None, vocab_size: int | None = None, cache: Path | None = None):
    return prepare_corpus(path, 64, "split", 0.0, seed=0, cache_dir=cache, vocab_size=vocab_size)


@pytest.fixture
def bad_line_7(tmp_path: Path) -> Path:
    """Id 300 on line 7, the 4th sequence (blank lines in between), and 500 on line 8."""
    lines = [tokens(1, 2, 3), None, None, {"text": "hello"}, None, tokens(5, 6)]
    return write_jsonl(tmp_path / "data.jsonl", [*lines, tokens(7, 300, 9), tokens(9, 500)])


def test_an_id_outside_the_vocabulary_names_its_file_and_line(bad_line_7: Path) -> None:
    with pytest.raises(ShardwiseError) as caught:
        prepared(bad_line_7, vocab_size=256)
    assert str(caught.value) == (
        f"{bad_line_7}:7: token id 300 is outside the vocabulary of 256 (--vocab-size 256) "
        "(and 1 more line; the largest id is 500); pass --vocab-size 501 or more, or fix the data"
    )


def test_the_line_is_found_again_through_the_cache(bad_line_7: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert prepared(bad_line_7, cache=cache).vocab_size == 501  # tokenised and cached here
    with pytest.raises(ShardwiseError, match=r"data\.jsonl:7: token id 300 .* of 300 "):
        prepared(bad_line_7, vocab_size=300, cache=cache)
    # One entry serves every vocabulary: it keeps the largest id, the run decides.
    assert len(list(cache.iterdir())) == 1
    assert prepared(bad_line_7, vocab_size=501, cache=cache).vocab_size == 501


@pytest.mark.parametrize("huge", [10**12, 2**63 - 1], ids=["1e12", "2**63-1"])
@pytest.mark.parametrize("given", [None, 256], ids=["inferred", "given"])
def test_an_absurd_id_is_one_line_not_an_overflow(
    tmp_path: Path, huge: int, given: int | None
) -> None:
    path = write_jsonl(tmp_path / "ids.jsonl", [tokens(1, 2, 3), None, tokens(4, huge)])
    with pytest.raises(ShardwiseError) as caught:
        prepared(path, vocab_size=given)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: token id {huge} ") and "\n" not in message
    assert message.endswith("; fix the data")  # no --vocab-size can hold it


def test_a_single_large_id_is_not_quietly_a_huge_vocabulary(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "ids.jsonl", [tokens(1, 2, 3), tokens(4, 100_000)])
    with pytest.raises(ShardwiseError) as caught:
        prepared(path)
    assert str(caught.value).startswith(f"{path}:2: token id 100000 would make a vocabulary of")
    assert "pass --vocab-size 100001 if that vocabulary is meant" in str(caught.value)
    assert prepared(path, vocab_size=100_001).vocab_size == 100_001


@pytest.mark.parametrize(
    ("largest", "vocab"), [(5, 256), (255, 256), (256, 257), (1000, 1001), (65_535, 65_536)]
)
def test_the_inferred_vocabulary_is_bytes_or_the_largest_id_plus_one(
    tmp_path: Path, largest: int, vocab: int
) -> None:
    path = write_jsonl(tmp_path / "ids.jsonl", [tokens(0, largest)])
    assert prepared(path).vocab_size == vocab


def test_text_is_bytes_and_a_smaller_vocabulary_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("aaa\r\n\r\nab\r\n\r\n\r\nzz\r\n")  # 'z' is byte 122
    assert prepared(path).vocab_size == 256
    with pytest.raises(ShardwiseError, match=r"notes\.txt:6: token id 122 .* of 100 "):
        prepared(path, vocab_size=100)


def test_the_default_corpus_is_bytes_too() -> None:
    with pytest.raises(ShardwiseError, match=r"^the default corpus \(paragraph \d+\): token id"):
        prepared(None, vocab_size=64)


def test_ids_inside_the_vocabulary_do_not_read_the_file_again(
    bad_line_7: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = prepared(bad_line_7, vocab_size=501)

    def reread(path: object) -> None:
        raise AssertionError("read again although every id is inside")

    monkeypatch.setattr(vocabulary, "numbered_sequences", reread)
    check_token_ids(corpus, 501, who="model 'lm:build'")
    with pytest.raises(AssertionError, match="read again"):  # only an error looks for the line
        check_token_ids(corpus, 500, who="model 'lm:build'")


def test_a_models_own_vocabulary_is_checked_with_its_name_and_fix(bad_line_7: Path) -> None:
    corpus = prepared(bad_line_7, vocab_size=501)
    with pytest.raises(ShardwiseError) as caught:
        check_token_ids(corpus, 300, who="model 'lm:build'", fix="build it with more tokens")
    assert str(caught.value) == (
        f"{bad_line_7}:7: token id 300 is outside the vocabulary of 300 (model 'lm:build') "
        "(and 1 more line; the largest id is 500); build it with more tokens, or fix the data"
    )


def test_a_larger_vocab_size_builds_the_model_with_it(bad_line_7: Path, tmp_path: Path) -> None:
    config = quick_config(bad_line_7, tmp_path / "run", vocab_size=1000)
    corpus = load_corpus(config)
    model = seeded_model(config, corpus.vocab_size)
    assert corpus.vocab_size == 1000
    assert model.embed.num_embeddings == model.head[-1].out_features == 1000
    assert default_cache_dir().is_dir()  # through the run's own cache


def test_a_model_of_your_own_may_infer_more_than_a_built_in(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "ids.jsonl", [tokens(1, 2, 3), tokens(4, 100_000)])
    config = quick_config(path, tmp_path / "run", model="user_models:odd_names")
    assert load_corpus(config).vocab_size == 100_001  # its own output size is checked later
