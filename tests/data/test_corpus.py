"""Corpus reading: the default corpus, text and JSONL files, and every user error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from shardwise.data.corpus import corpus_fingerprint, default_paragraphs, read_sequences
from shardwise.data.tokenize import decode
from shardwise.errors import ShardwiseError


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def test_default_corpus_is_many_paragraphs_of_varied_length():
    paragraphs = default_paragraphs()
    assert len(paragraphs) > 1000
    assert all(p and p == p.strip() for p in paragraphs)
    lengths = np.array([len(p) for p in paragraphs])
    assert lengths.max() > 10 * np.median(lengths)
    assert default_paragraphs() == paragraphs


def test_default_corpus_reads_as_encoded_paragraphs():
    sequences = read_sequences(None)
    assert len(sequences) == len(default_paragraphs())
    assert all(s.dtype == np.uint8 for s in sequences)
    assert decode(sequences[0]) == default_paragraphs()[0]


def test_text_file_gives_one_sequence_per_paragraph(tmp_path):
    text = "first line\nstill first\n\n\n  \n  indented second\r\n\r\nthird é\n\n"
    sequences = read_sequences(_write(tmp_path / "corpus.txt", text))
    assert [decode(s) for s in sequences] == [
        "first line\nstill first",
        "  indented second",
        "third é",
    ]
    assert all(s.dtype == np.uint8 for s in sequences)


def test_utf8_byte_order_mark_is_not_a_token(tmp_path):
    sequences = read_sequences(_write(tmp_path / "bom.md", "\ufeffhi".encode()))
    assert decode(sequences[0]) == "hi"


def test_jsonl_reads_text_and_tokens_and_skips_blank_lines(tmp_path):
    lines = [json.dumps({"text": "héllo", "id": 1}), "", "   ", json.dumps({"tokens": [3, 0, 900]})]
    sequences = read_sequences(_write(tmp_path / "c.jsonl", "\n".join(lines) + "\n"))
    assert len(sequences) == 2
    assert sequences[0].dtype == np.uint8 and decode(sequences[0]) == "héllo"
    assert sequences[1].dtype == np.int64 and sequences[1].tolist() == [3, 0, 900]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "no sequences"),
        ("  \n\n\t\n", "no sequences"),
        (b"abc\x00def", "looks binary"),
        (b"caf\xe9 latin-1\n", "looks binary"),
    ],
    ids=["empty", "whitespace", "nul", "invalid-utf8"],
)
@pytest.mark.parametrize("name", ["corpus.txt", "corpus.jsonl"])
def test_unusable_files_are_named_in_one_line_errors(tmp_path, name, content, match):
    path = _write(tmp_path / name, content)
    with pytest.raises(ShardwiseError, match=match) as caught:
        read_sequences(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ShardwiseError, match="not found"):
        read_sequences(tmp_path / "nope.txt")
    with pytest.raises(ShardwiseError, match="is a directory"):
        read_sequences(tmp_path)
    with pytest.raises(ShardwiseError, match="not found"):
        corpus_fingerprint(tmp_path / "nope.txt")


@pytest.mark.timeout(10)
def test_a_pipe_or_a_device_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)  # reading it would block forever: nobody writes
    for path in (fifo, Path("/dev/zero")):  # /dev/zero never ends
        with pytest.raises(ShardwiseError, match="not a regular file"):
            read_sequences(path)
        with pytest.raises(ShardwiseError, match="not a regular file"):
            corpus_fingerprint(path)


def test_unreadable_file(tmp_path, monkeypatch):
    # chmod does not stop root, so simulate the OS refusing the read.
    path = _write(tmp_path / "locked.txt", "text")

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ShardwiseError, match="cannot be read"):
        read_sequences(path)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "unterminated}', "not valid JSON"),
        ('["text", "x"]', "expected a JSON object, got list"),
        ('{"body": "x"}', "needs a 'text' or 'tokens' field"),
        ('{"text": 5}', "'text' must be a string"),
        ('{"tokens": "1 2 3"}', "list of non-negative integers, got str"),
        ('{"tokens": [1, -2]}', "non-negative integers, got -2"),
        ('{"tokens": [1, 2.5]}', "got 2.5"),
        ('{"tokens": [true]}', "got true"),
        ('{"tokens": [99999999999999999999]}', "below 2\\*\\*63"),
        ('{"text": "a", "tokens": [1]}', "both 'text' and 'tokens'"),
    ],
)
def test_bad_jsonl_line_is_reported_with_its_line_number(tmp_path, line, match):
    path = _write(tmp_path / "c.jsonl", '{"text": "ok"}\n\n' + line + "\n")
    with pytest.raises(ShardwiseError, match=match) as caught:
        read_sequences(path)
    assert f"{path}:3:" in str(caught.value)


def test_fingerprint_is_short_stable_and_content_based(tmp_path):
    a = _write(tmp_path / "a.txt", "same")
    b = _write(tmp_path / "b.txt", "same")
    c = _write(tmp_path / "c.txt", "different")
    assert corpus_fingerprint(a) == corpus_fingerprint(str(b)) != corpus_fingerprint(c)
    assert len(corpus_fingerprint(a)) == 16
    assert corpus_fingerprint(None) == corpus_fingerprint(None) != corpus_fingerprint(a)
