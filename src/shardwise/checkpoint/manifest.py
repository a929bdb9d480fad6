"""A digest of every file in a checkpoint, written last and verified before anything is read.

    digests = digest_files(root, ["__0_0.distcp", "rng/rank0.safetensors"])
    write_manifest(root, digests)      # the checkpoint is complete once this file exists
    VerifiedFiles(root).verify_all()   # raises CheckpointRejected naming the first bad file

The manifest proves the files are the ones written (no flipped byte, truncation, missing or
extra file); it is not a signature. Whoever can write the directory can rewrite it, so the
loader's safety never rests on it: see `metadata.py` and `state.py`. Reading a checkpoint
checks each file against it as it is read: `verified.py`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shardwise.checkpoint.errors import CheckpointRejected, describe
from shardwise.checkpoint.files import write_durably

MANIFEST_FILE = "manifest.json"
Record = TypeVar("Record", bound=BaseModel)
MAX_MANIFEST_BYTES = 16 << 20


class FileDigest(BaseModel):
    """Size and SHA-256 of one file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """What `manifest.json` holds: every other file of the checkpoint, by relative path."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    format: int = Field(1, ge=1, le=1)
    files: dict[str, FileDigest]


def digest_file(path: Path, flush: bool = False) -> FileDigest:
    """Size and SHA-256 of a file; `flush` also forces a file we just wrote to the disk."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if flush:
            os.fsync(handle.fileno())
        return FileDigest(bytes=os.fstat(handle.fileno()).st_size, sha256=digest)


def digest_files(root: Path, relative_paths: list[str]) -> dict[str, FileDigest]:
    """Digests of `relative_paths` under `root`, keyed by their posix relative path."""
    return {name: digest_file(root / name, flush=True) for name in relative_paths}


def listed_files(root: Path) -> list[str]:
    """Every entry under `root` but the manifest and folders, as posix paths relative to it.

    Links, pipes and devices count too (without being followed), so that verification refuses
    them rather than overlooking them.
    """
    return sorted(name for name in _entries(root, "") if name != MANIFEST_FILE)


def _entries(root: Path, prefix: str) -> list[str]:
    names = []
    with os.scandir(root) as scan:
        for entry in scan:
            if entry.is_dir(follow_symlinks=False):
                names += _entries(Path(entry.path), f"{prefix}{entry.name}/")
            else:
                names.append(prefix + entry.name)
    return names


def write_manifest(root: Path, digests: dict[str, FileDigest]) -> None:
    """Write the manifest of `root` last; every file in `root` must be in `digests`."""
    missing = set(listed_files(root)) - set(digests)
    if missing:  # a file nobody hashed would be refused by every later load
        raise RuntimeError(f"checkpoint files without a digest: {sorted(missing)}")
    manifest = Manifest(files=dict(sorted(digests.items())))
    write_durably(root / MANIFEST_FILE, manifest.model_dump_json(indent=1))


def is_sealed(root: Path) -> bool:
    """Whether `root` has a manifest: a save that finished (not yet verified).

    False where `root` cannot be looked into: verification says why, when it is tried.
    """
    try:
        return (root / MANIFEST_FILE).is_file()
    except OSError:  # Python < 3.12 raises EACCES here rather than answering False
        return False


def parse_record(root: Path, name: str, data: bytes, schema: type[Record]) -> Record:
    """JSON `data` of file `name` in checkpoint `root`, validated by `schema`; one-line refusal."""
    try:
        return schema.model_validate_json(data)
    except (ValueError, ValidationError, RecursionError) as exc:
        raise CheckpointRejected(root, f"{name} is malformed ({describe(exc)})") from None
