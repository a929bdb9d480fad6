"""Keep prepared token sequences between runs, so a corpus is read and tokenised only once.

    path = cache_path(corpus_fingerprint("notes.txt"), max_len=256, policy="split")
    save_sequences(path, {"train": train}, meta={"largest_id": 255})   # atomic
    groups, meta = load_sequences(path)                                # None if absent or bad

Each entry is one .npz file: per group of sequences, one flat token array and the offsets that
cut it back into sequences (loaded sequences are views of the flat array), plus a JSON note of
whatever else the caller wants back. Entries are named by a hash of the corpus fingerprint, the
processing settings and a format version, so a changed corpus or setting never hits a stale
entry; old entries are simply left behind. The cache lives in $SHARDWISE_CACHE, else
$XDG_CACHE_HOME/shardwise, else ~/.cache/shardwise.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the stored layout or the processing behind it changes: old entries then miss.
FORMAT_VERSION = 2  # 2: meta keeps the largest token id, not a vocabulary
_META = "meta.json"


def default_cache_dir() -> Path:
    """Where cached corpora live: $SHARDWISE_CACHE, $XDG_CACHE_HOME/shardwise or ~/.cache.

    default_cache_dir()   # e.g. PosixPath('/home/me/.cache/shardwise')
    """
    if explicit := os.environ.get("SHARDWISE_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shardwise"


def cache_path(fingerprint: str, cache_dir: Path | None = None, **settings: Any) -> Path:
    """The cache file for a corpus (by `corpus_fingerprint`) processed with `settings`.

    cache_path("3f9a0c1d5e7b2a64", max_len=256, policy="split")
    # ~/.cache/shardwise/corpus-<16 hex digits>.npz
    """
    key = json.dumps({"format": FORMAT_VERSION, "corpus": fingerprint, **settings}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (cache_dir or default_cache_dir()) / f"corpus-{digest}.npz"


def save_sequences(path: Path, groups: dict[str, list[np.ndarray]], meta: dict[str, Any]) -> None:
    """Write `groups` of sequences and a JSON-able `meta` to `path`, atomically.

    save_sequences(path, {"train": train, "eval": held_out}, {"largest_id": 255})

    The file appears whole or not at all: it is written beside its final name and renamed, so
    ranks writing the same entry at once, or a run killed mid-write, never leave a torn file.
    Sequences of one group share a dtype on the way back (NumPy's common type of them all).
    """
    arrays: dict[str, np.ndarray] = {_META: np.array(json.dumps(meta))}
    for name, sequences in groups.items():
        lengths = np.array([len(seq) for seq in sequences], dtype=np.int64)
        arrays[f"{name}.offsets"] = np.concatenate([[0], np.cumsum(lengths)])
        arrays[f"{name}.tokens"] = (
            np.concatenate(sequences) if sequences else np.zeros(0, dtype=np.uint8)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
        try:
            np.savez(handle, **arrays)
        except BaseException:
            temporary.unlink()
            raise
    os.replace(temporary, path)


def load_sequences(path: Path) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]] | None:
    """The groups and meta saved at `path`, or None if there is no readable entry there.

    hit = load_sequences(path)
    groups, meta = hit if hit is not None else (rebuild(), {})
    """
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored[_META]))
            names = [key.removesuffix(".tokens") for key in stored.files if key.endswith(".tokens")]
            groups = {
                name: _split(stored[f"{name}.tokens"], stored[f"{name}.offsets"]) for name in names
            }
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        # A damaged entry (disk full, foreign file) is a miss, not an error: it gets rebuilt.
        return None
    return groups, meta


def _split(tokens: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [tokens[start:stop] for start, stop in itertools.pairwise(offsets.tolist())]
