"""Byte-level tokenisation: a token is one byte of the UTF-8 encoding.

    tokens = encode("héllo")          # uint8 array of 6 bytes
    assert decode(tokens) == "héllo"

Bytes need no vocabulary file and can represent any text, which keeps the built-in models and
corpora self-contained; the price is longer sequences than a subword tokeniser would give.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VOCAB_SIZE = 256


def encode(text: str) -> np.ndarray:
    """Encode text as its UTF-8 bytes, one uint8 token per byte.

    encode("a€")       # array([ 97, 226, 130, 172], dtype=uint8)
    len(encode(""))    # 0
    """
    # frombuffer over bytes is read-only; copy so callers own a normal, writable array.
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens: np.ndarray | Sequence[int]) -> str:
    """Decode byte tokens back to text; invalid UTF-8 (e.g. a cut-off sample) becomes U+FFFD.

    decode(encode("naïve"))     # "naïve"
    decode([104, 105, 226])     # "hi\ufffd"
    """
    array = np.asarray(tokens)
    if array.size and (array.min() < 0 or array.max() >= VOCAB_SIZE):
        # Casting would silently wrap such values; tokens outside 0..255 are a caller bug.
        raise ValueError(
            f"byte tokens must lie in 0..{VOCAB_SIZE - 1}, got {array.min()}..{array.max()}"
        )
    return array.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
