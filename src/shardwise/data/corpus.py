"""Read a training corpus into token sequences: the built-in default, a text file or JSONL.

    sequences = read_sequences("notes.txt")   # one uint8 array per paragraph
    sequences = read_sequences(None)          # the default corpus that ships with Python

A text file holds one sequence per paragraph (blank lines separate them). A `.jsonl` file holds
one JSON object per line, with either `"text": "..."` (encoded to bytes) or `"tokens": [ints]`
(kept as int64; the caller checks them against the model's vocabulary). Every problem with the
file is a ShardwiseError naming the file, the line where there is one, and the fix.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics as _PYDOC_TOPICS

import numpy as np

from shardwise.data.tokenize import encode
from shardwise.errors import ShardwiseError

# NUL never appears in real text, so its presence early on is a cheap, reliable binary sniff.
_BINARY_SNIFF_BYTES = 64 * 1024
_USE_INSTEAD = "pass a UTF-8 text file (paragraphs separated by blank lines) or a .jsonl file"


def default_paragraphs() -> list[str]:
    """The default corpus: Python's own documentation topics, split into paragraphs.

        paragraphs = default_paragraphs()   # ~2,600 strings, from a few bytes to a few KB
        paragraphs == default_paragraphs()  # True: same order on every call and machine

    `pydoc_data.topics` (~465 KB) ships with every CPython, so training runs with no download.
    Paragraphs keep their natural, very uneven lengths, which is what length-aware samplers and
    packing are for. The text differs between Python versions; see `corpus_fingerprint`.
    """
    return list(_default_paragraphs())


@functools.cache
def _default_paragraphs() -> tuple[str, ...]:
    # A tuple, so callers of the public function can't mutate the cached value.
    return tuple(
        stripped
        for key in sorted(_PYDOC_TOPICS)
        for paragraph in _split_paragraphs(_PYDOC_TOPICS[key])
        if (stripped := paragraph.strip())
    )


@dataclass(frozen=True)
class CorpusSource:
    """A corpus's bytes, read once: what is hashed for the cache is what gets tokenised."""

    path: Path | None  # None: the default corpus
    raw: bytes = b""

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 (hex) of the source: the file's bytes, or the default corpus's topics."""
        digest = hashlib.sha256()
        if self.path is None:
            for key in sorted(_PYDOC_TOPICS):
                # NUL separators keep ("ab", "c") and ("a", "bc") from hashing alike.
                digest.update(f"{key}\0{_PYDOC_TOPICS[key]}\0".encode())
        else:
            digest.update(self.raw)
        return digest.hexdigest()


def read_source(path: str | Path | None) -> CorpusSource:
    """The corpus's bytes as they are now, or the default corpus (None).

        source = read_source("notes.txt")
        source.digest, read_sequences(source)   # the hash and the tokens of the same bytes

    Raises ShardwiseError if the file is missing, a directory, not a regular file or unreadable.
    """
    if path is None:
        return CorpusSource(None)
    return CorpusSource(Path(path), _read_bytes(Path(path)))


def read_sequences(path: str | Path | CorpusSource | None) -> list[np.ndarray]:
    """Read a corpus as token sequences: uint8 arrays for text, int64 arrays for JSONL tokens.

        read_sequences("corpus.jsonl")   # [array([104, 105], dtype=uint8), array([5, 9]), ...]
        read_sequences(None)             # default_paragraphs(), encoded
        read_sequences(read_source("corpus.jsonl"))   # the bytes read_source read, no others

    Raises ShardwiseError if the file is missing, a directory, unreadable, binary, holds no
    sequences, or (JSONL) has a line that is not an object with a valid `text` or `tokens`.
    """
    source = path if isinstance(path, CorpusSource) else read_source(path)
    if source.path is None:
        return [encode(paragraph) for paragraph in default_paragraphs()]
    text = _decode(source.path, source.raw)
    if source.path.suffix.lower() == ".jsonl":
        sequences = _parse_jsonl(source.path, text)
    else:
        sequences = [encode(paragraph) for paragraph in _split_paragraphs(text)]
    if not sequences:
        raise ShardwiseError(
            f"{source.path}: no sequences found (it is empty or only blank lines); {_USE_INSTEAD}"
        )
    return sequences


def corpus_fingerprint(path: str | Path | None) -> str:
    """A short, stable hash of a corpus's source bytes, for use as a cache key.

        corpus_fingerprint("corpus.txt")   # e.g. "3f9a0c1d5e7b2a64"
        corpus_fingerprint(None)           # hash of the default topics; changes with Python

    It hashes the raw input only; a cache that stores processed sequences should add its own
    processing settings (and a format version) to the key.
    """
    return read_source(path).digest[:16]


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ShardwiseError(f"{path}: file not found; {_USE_INSTEAD}")
    if path.is_dir():
        raise ShardwiseError(f"{path}: is a directory; pass a file inside it instead")
    if not path.is_file():
        # A pipe would block the run forever and a device (/dev/zero) never ends: refuse both.
        raise ShardwiseError(
            f"{path}: is not a regular file (a pipe, socket or device); pass a file instead"
        )
    try:
        return path.read_bytes()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ShardwiseError(
            f"{path}: cannot be read ({reason}); check its permissions or pass another file"
        ) from None


def _decode(path: Path, raw: bytes) -> str:
    if b"\0" in raw[:_BINARY_SNIFF_BYTES]:
        raise ShardwiseError(f"{path}: looks binary (contains NUL bytes); {_USE_INSTEAD}")
    try:
        # utf-8-sig drops a leading byte-order mark, which would otherwise become tokens
        # (text) or break the first JSON line.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ShardwiseError(
            f"{path}: looks binary (not valid UTF-8 at byte {error.start}); "
            f"{_USE_INSTEAD}, re-encoding it first if needed (e.g. iconv -t UTF-8)"
        ) from None


def _split_paragraphs(text: str) -> list[str]:
    """Paragraphs are runs of non-blank lines; indentation and inner line breaks are kept."""
    paragraphs: list[str] = []
    current: list[str] = []
    # Split on "\n" only: str.splitlines would also break on form feeds and U+2028 in the text.
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def numbered_sequences(path: str | Path) -> Iterator[tuple[int, np.ndarray]]:
    """Each non-blank line's tokens with its line number: a JSONL record, or a text line's bytes.

        for line, tokens in numbered_sequences("corpus.jsonl"): ...   # (1, array([5, 9])), ...

    Blank lines are skipped, so the n-th sequence is not always on line n: this is how a check
    of the tokens finds the line of a bad one again. It reads the file anew on every call.
    """
    path = Path(path)
    text = _decode(path, _read_bytes(path))
    if path.suffix.lower() == ".jsonl":
        for n, line in _numbered_lines(text):
            yield n, _parse_jsonl_line(f"{path}:{n}", line)
    else:  # the bytes read_sequences trains on: paragraphs are joined with "\n", not "\r\n"
        for n, line in _numbered_lines(text.replace("\r\n", "\n")):
            yield n, encode(line)


def _numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    # Split on "\n" only, as _split_paragraphs does.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line


def _parse_jsonl(path: Path, text: str) -> list[np.ndarray]:
    return [_parse_jsonl_line(f"{path}:{n}", line) for n, line in _numbered_lines(text)]


def _parse_jsonl_line(where: str, line: str) -> np.ndarray:
    example = '{"text": "..."} or {"tokens": [1, 2, 3]}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ShardwiseError(
            f"{where}: not valid JSON ({error.msg}); write one object per line, like {example}"
        ) from None
    except RecursionError:  # the parser recurses once per level: [[[[...]]]] overflows it
        raise ShardwiseError(
            f"{where}: nested too deeply for the JSON parser; write one object per line, "
            f"like {example}"
        ) from None
    if not isinstance(record, dict):
        raise ShardwiseError(
            f"{where}: expected a JSON object, got {type(record).__name__}; write {example}"
        )
    has_text, has_tokens = "text" in record, "tokens" in record
    if has_text and has_tokens:
        # Training on one and silently ignoring the other would be a guess; make the user pick.
        raise ShardwiseError(f"{where}: has both 'text' and 'tokens'; keep only one of them")
    if has_text:
        if not isinstance(record["text"], str):
            raise ShardwiseError(f"{where}: 'text' must be a string; write {example}")
        return encode(record["text"])
    if has_tokens:
        return _tokens_array(where, record["tokens"])
    raise ShardwiseError(f"{where}: needs a 'text' or 'tokens' field; write {example}")


def _tokens_array(where: str, tokens: object) -> np.ndarray:
    fix = "'tokens' must be a list of non-negative integers"
    if not isinstance(tokens, list):
        raise ShardwiseError(f"{where}: {fix}, got {type(tokens).__name__}")
    for token in tokens:
        # bool is a subclass of int, but true/false in a token list is a mistake.
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ShardwiseError(f"{where}: {fix}, got {json.dumps(token)}")
    try:
        return np.array(tokens, dtype=np.int64)
    except OverflowError:
        raise ShardwiseError(f"{where}: {fix} below 2**63, got a larger one") from None
