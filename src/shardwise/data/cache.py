"""Keep prepared token sequences between runs, so a corpus is read and tokenised only once.

    key = cache_key(source_digest, max_len=256, policy="split")
    path = cache_path(source_digest, max_len=256, policy="split")
    save_sequences(path, {"train": train}, {"largest_id": 255}, made_from=key)   # atomic
    groups, meta = load_sequences(path, made_from=key)          # None if absent or not good

Each entry is one .npz file: per group of sequences, one flat token array and the offsets that
cut it back into sequences (loaded sequences are views of the flat array), a JSON note of
whatever else the caller wants back, and a SHA-256 digest of all of it and of what it was made
from. Entries are named by a hash of the corpus fingerprint, the processing settings and a
format version, so a changed corpus or setting never hits a stale entry; old entries are simply
left behind. The cache lives in $SHARDWISE_CACHE, else $XDG_CACHE_HOME/shardwise, else
~/.cache/shardwise.

An entry is used only when it is a regular file (not a link, pipe or device) of this user that
no one else may write, whose digest matches its contents and what the caller made it from:
anything else is a miss, rebuilt over. The digest is no signature: this user can write an entry
that passes, as they can edit the corpus itself.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

# Bump when the stored layout or the processing behind it changes: old entries then miss.
FORMAT_VERSION = 3  # 3: a digest over the entry and what it was made from
_META = "meta.json"
_DIGEST = "digest"


def default_cache_dir() -> Path:
    """Where cached corpora live: $SHARDWISE_CACHE, $XDG_CACHE_HOME/shardwise or ~/.cache.

    default_cache_dir()   # e.g. PosixPath('/home/me/.cache/shardwise')
    """
    if explicit := os.environ.get("SHARDWISE_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shardwise"


def cache_key(fingerprint: str, **settings: Any) -> str:
    """What an entry is made from: a corpus (by its digest) processed with `settings`.

    cache_key("3f9a0c1d5e7b2a64", max_len=256)   # '{"corpus": "3f9a...", "format": 3, ...}'
    """
    return json.dumps({"format": FORMAT_VERSION, "corpus": fingerprint, **settings}, sort_keys=True)


def cache_path(fingerprint: str, cache_dir: Path | None = None, **settings: Any) -> Path:
    """The cache file for a corpus (by `corpus_fingerprint`) processed with `settings`.

    cache_path("3f9a0c1d5e7b2a64", max_len=256, policy="split")
    # ~/.cache/shardwise/corpus-<16 hex digits>.npz
    """
    digest = hashlib.sha256(cache_key(fingerprint, **settings).encode()).hexdigest()[:16]
    return (cache_dir or default_cache_dir()) / f"corpus-{digest}.npz"


def save_sequences(
    path: Path, groups: dict[str, list[np.ndarray]], meta: dict[str, Any], made_from: str = ""
) -> None:
    """Write `groups` of sequences and a JSON-able `meta` to `path`, atomically.

    save_sequences(path, {"train": train, "eval": held_out}, {"largest_id": 255}, made_from=key)

    The file appears whole or not at all: it is written beside its final name and renamed, so
    ranks writing the same entry at once, or a run killed mid-write, never leave a torn file.
    Sequences of one group share a dtype on the way back (NumPy's common type of them all).
    `made_from` (see `cache_key`) goes into the entry's digest: loading it for anything else
    misses.
    """
    arrays: dict[str, np.ndarray] = {_META: np.array(json.dumps(meta))}
    for name, sequences in groups.items():
        lengths = np.array([len(seq) for seq in sequences], dtype=np.int64)
        arrays[f"{name}.offsets"] = np.concatenate([[0], np.cumsum(lengths)])
        arrays[f"{name}.tokens"] = (
            np.concatenate(sequences) if sequences else np.zeros(0, dtype=np.uint8)
        )
    arrays[_DIGEST] = np.array(_digest(arrays, made_from))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
        try:
            np.savez(handle, **arrays)
        except BaseException:
            temporary.unlink()
            raise
    os.replace(temporary, path)


def load_sequences(
    path: Path, made_from: str = ""
) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]] | None:
    """The groups and meta saved at `path` for `made_from`, or None if there is no good entry.

    hit = load_sequences(path, made_from=key)
    groups, meta = hit if hit is not None else (rebuild(), {})

    None (a miss, which the caller rebuilds over) also for an entry that is not a regular file
    of this user, that others may write, whose digest does not match, or that is malformed.
    """
    try:
        with _open_entry(path) as handle, zipfile.ZipFile(handle) as archive:
            members = archive.infolist()
            if any(member.compress_type != zipfile.ZIP_STORED for member in members):
                return None  # np.savez never compresses: this one was not written here
            arrays = {
                member.filename.removesuffix(".npy"): np.lib.format.read_array(
                    archive.open(member), allow_pickle=False
                )
                for member in members
            }
    except (OSError, ValueError, KeyError, EOFError, MemoryError, zipfile.BadZipFile):
        # Absent, damaged (disk full), not ours or not a file at all: a miss, rebuilt over.
        return None
    digest = arrays.pop(_DIGEST, None)
    if digest is None or not hmac.compare_digest(str(digest), _digest(arrays, made_from)):
        return None
    try:
        meta = json.loads(str(arrays[_META]))
        names = [key.removesuffix(".tokens") for key in arrays if key.endswith(".tokens")]
        groups = {
            name: _split(arrays[f"{name}.tokens"], arrays[f"{name}.offsets"]) for name in names
        }
    except (ValueError, KeyError, RecursionError):
        return None
    return groups, meta


def _open_entry(path: Path) -> IO[bytes]:
    """`path` opened for reading if it is a regular file of this user that others cannot write.

    O_NOFOLLOW: a link could name any file; O_NONBLOCK: opening a FIFO would wait for a writer.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    handle = os.fdopen(descriptor, "rb")
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        handle.close()
        raise OSError(f"{path}: not a regular file of this user, writable by no one else")
    return handle


def _digest(arrays: dict[str, np.ndarray], made_from: str) -> str:
    """SHA-256 of what the entry was made from and every array in it: name, type, shape, bytes."""
    digest = hashlib.sha256(made_from.encode() + b"\0")
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array)  # the buffer itself: no copy of a large corpus
    return digest.hexdigest()


def _split(tokens: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Cut the flat tokens back into sequences; ValueError unless the offsets tile them."""
    flat = tokens.ndim == offsets.ndim == 1
    if not flat or tokens.dtype.kind not in "iu" or offsets.dtype.kind not in "iu":
        raise ValueError("not a flat array of token ids and its offsets")
    bounds = offsets.tolist()
    if bounds[:1] != [0] or bounds[-1] != len(tokens) or np.any(np.diff(bounds) < 0):
        raise ValueError("the offsets do not cut these tokens into sequences")
    return [tokens[start:stop] for start, stop in itertools.pairwise(bounds)]
