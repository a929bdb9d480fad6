"""Byte-level tokeniser: UTF-8 round-trips, dtype and vocabulary bounds."""

from __future__ import annotations

import numpy as np
import pytest

from shardwise.data.tokenize import VOCAB_SIZE, decode, encode


def test_encode_gives_utf8_bytes_as_uint8():
    tokens = encode("a€")
    assert tokens.dtype == np.uint8
    assert tokens.tolist() == list("a€".encode())
    assert tokens.flags.writeable


@pytest.mark.parametrize("text", ["", "hello", "naïve café", "日本語 ✓ 🙂", "tab\tnew\nline"])
def test_round_trip(text):
    assert decode(encode(text)) == text


def test_decode_accepts_int_lists_and_replaces_invalid_utf8():
    assert decode([104, 105, 226]) == "hi\ufffd"
    assert decode(np.array([104, 105], dtype=np.int64)) == "hi"


def test_decode_rejects_tokens_outside_the_byte_range():
    assert VOCAB_SIZE == 256
    with pytest.raises(ValueError):
        decode([65, 256])
    with pytest.raises(ValueError):
        decode([-1])
