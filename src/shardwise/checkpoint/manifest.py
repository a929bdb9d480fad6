"""A digest of every file in a checkpoint, written last and verified before anything is read.

    digests = digest_files(root, ["__0_0.distcp", "rng/rank0.safetensors"])
    write_manifest(root, digests)      # the checkpoint is complete once this file exists
    verify_manifest(root)              # raises CheckpointRejected naming the first bad file

The manifest proves the files are the ones written (no flipped byte, truncation, missing or
extra file); it is not a signature. Whoever can write the directory can rewrite it, so the
loader's safety never rests on it: see `metadata.py` and `state.py`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path, PurePosixPath
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shardwise.checkpoint.errors import CheckpointRejected, describe
from shardwise.checkpoint.files import write_durably

MANIFEST_FILE = "manifest.json"
Record = TypeVar("Record", bound=BaseModel)
_MAX_MANIFEST_BYTES = 16 << 20


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
    """Whether `root` has a manifest: a save that finished (not yet verified)."""
    return (root / MANIFEST_FILE).is_file()


def verify_manifest(root: Path) -> Manifest:
    """Check every file of `root` against its manifest; the manifest if all match."""
    manifest = read_manifest(root)
    for name, expected in manifest.files.items():
        _check_name(root, name)
        path = root / name
        if not path.exists() and not path.is_symlink():
            raise CheckpointRejected(root, f"{name} is missing (listed in {MANIFEST_FILE})")
        check_regular_file(root, name)
        found = digest_file(path)
        if found.bytes != expected.bytes:
            raise CheckpointRejected(
                root, f"{name} has {found.bytes} bytes, {MANIFEST_FILE} says {expected.bytes}"
            )
        if found.sha256 != expected.sha256:
            raise CheckpointRejected(
                root, f"{name} does not match its digest in {MANIFEST_FILE} (corrupted or edited)"
            )
    present = listed_files(root)
    for name in present:
        check_regular_file(root, name)
    extra = sorted(set(present) - set(manifest.files))
    if extra:
        raise CheckpointRejected(root, f"{extra[0]} is not listed in {MANIFEST_FILE}")
    return manifest


def read_manifest(root: Path) -> Manifest:
    """The parsed manifest of `root`, or CheckpointRejected saying what is wrong with it."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointRejected(
            root, f"no {MANIFEST_FILE}: the save did not finish, or an older shardwise wrote it"
        )
    return read_record(root, MANIFEST_FILE, Manifest, _MAX_MANIFEST_BYTES)


def read_record(root: Path, name: str, schema: type[Record], max_bytes: int) -> Record:
    """JSON file `name` of checkpoint `root`, validated by `schema`; one-line refusal if not."""
    check_regular_file(root, name)
    if (root / name).stat().st_size > max_bytes:
        raise CheckpointRejected(root, f"{name} is implausibly large")
    try:
        return schema.model_validate_json((root / name).read_bytes())
    except (ValueError, ValidationError, RecursionError) as exc:
        raise CheckpointRejected(root, f"{name} is malformed ({describe(exc)})") from None


def check_regular_file(root: Path, name: str) -> None:
    """Refuse links, pipes, sockets and devices: opening one could block, or read elsewhere."""
    try:
        mode = os.lstat(root / name).st_mode
    except OSError:
        raise CheckpointRejected(root, f"{name} is missing") from None
    if not stat.S_ISREG(mode):
        raise CheckpointRejected(root, f"{name} is not a regular file")


def _check_name(root: Path, name: str) -> None:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise CheckpointRejected(root, f"{MANIFEST_FILE} names a path outside it ({name!r})")
