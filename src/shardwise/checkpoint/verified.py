"""A sealed checkpoint's files, each read once and checked against its digest as it is read.

    with VerifiedFiles(path) as files:     # the manifest parsed, the folder held open
        files.verify_all()                 # every file listed matches; none missing or extra
        data = files.read(STATE_FILE)      # these very bytes match their digest, or it raises

Hashing a file and then opening it again to load it leaves a gap in which it can be swapped,
so nothing here is opened twice: the bytes hashed are the bytes handed on. The folder is
opened once, not through a link, and every file relative to it without following links or
blocking on a FIFO; renaming the folder or planting a link inside it changes nothing we read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path, PurePosixPath
from types import TracebackType

from shardwise.checkpoint.errors import CheckpointRejected
from shardwise.checkpoint.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    FileDigest,
    Manifest,
    parse_record,
)

_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FOLDER_FLAGS = _FLAGS | os.O_DIRECTORY
_CHUNK = 1 << 20
SYMLINK_REASON = "it is a symbolic link (checkpoints are read only where they were written)"


class VerifiedFiles:
    """The files of checkpoint `root` as its manifest lists them; close (or use `with`) after."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._folder = _open_folder(self.root)
        try:
            self.manifest = self._read_manifest()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> VerifiedFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._folder >= 0:
            os.close(self._folder)
            self._folder = -1

    def read(self, name: str, max_bytes: int | None = None) -> bytes:
        """The bytes of `name`, read once; CheckpointRejected unless they match the manifest."""
        expected = self._expected(name)
        if max_bytes is not None and expected.bytes > max_bytes:
            raise CheckpointRejected(self.root, f"{name} is implausibly large")
        descriptor = self._open(name)
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read(expected.bytes + 1)  # one more: a file that grew says so
        self._compare(name, expected, len(data), hashlib.sha256(data).hexdigest())
        return data

    def verify_all(self) -> None:
        """Every file the manifest lists matches it; no other file, link or pipe is there."""
        for name, expected in self.manifest.files.items():
            self._expected(name)
            digest, size = hashlib.sha256(), 0
            with os.fdopen(self._open(name), "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
            self._compare(name, expected, size, digest.hexdigest())
        present = self._entries(self._folder, "")
        for name, regular in present:
            if not regular:
                raise CheckpointRejected(self.root, f"{name} is not a regular file")
        extra = sorted({name for name, _ in present} - set(self.manifest.files) - {MANIFEST_FILE})
        if extra:
            raise CheckpointRejected(self.root, f"{extra[0]} is not listed in {MANIFEST_FILE}")

    def _read_manifest(self) -> Manifest:
        try:
            descriptor = self._open_in(self._folder, MANIFEST_FILE, MANIFEST_FILE)
        except CheckpointRejected as exc:
            if exc.reason != f"{MANIFEST_FILE} is missing":
                raise
            raise CheckpointRejected(
                self.root,
                f"no {MANIFEST_FILE}: the save did not finish, or an older shardwise wrote it",
            ) from None
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise CheckpointRejected(self.root, f"{MANIFEST_FILE} is implausibly large")
        manifest = parse_record(self.root, MANIFEST_FILE, data, Manifest)
        for name in manifest.files:
            _check_name(self.root, name)
        return manifest

    def _expected(self, name: str) -> FileDigest:
        expected = self.manifest.files.get(name)
        if expected is None:
            raise CheckpointRejected(self.root, f"{name} is missing (not in {MANIFEST_FILE})")
        return expected

    def _compare(self, name: str, expected: FileDigest, size: int, sha256: str) -> None:
        if size != expected.bytes:
            raise CheckpointRejected(
                self.root, f"{name} has {size} bytes, {MANIFEST_FILE} says {expected.bytes}"
            )
        if sha256 != expected.sha256:
            raise CheckpointRejected(
                self.root,
                f"{name} does not match its digest in {MANIFEST_FILE} (corrupted or edited)",
            )

    def _open(self, name: str) -> int:
        """A descriptor for listed file `name`, reached folder by folder without links."""
        *folders, leaf = name.split("/")
        parent, opened = self._folder, []
        try:
            for folder in folders:
                parent = self._open_in(parent, folder, name, _FOLDER_FLAGS)
                opened.append(parent)
            return self._open_in(parent, leaf, name)
        except CheckpointRejected as exc:
            if exc.reason != f"{name} is missing":
                raise
            raise CheckpointRejected(
                self.root, f"{name} is missing (listed in {MANIFEST_FILE})"
            ) from None
        finally:
            for descriptor in opened:
                os.close(descriptor)

    def _open_in(self, parent: int, entry: str, name: str, flags: int = _FLAGS) -> int:
        try:
            descriptor = os.open(entry, flags, dir_fd=parent)
        except OSError as exc:
            raise CheckpointRejected(self.root, _unreadable(name, exc)) from None
        kind = os.fstat(descriptor).st_mode
        if not (stat.S_ISDIR(kind) if flags & os.O_DIRECTORY else stat.S_ISREG(kind)):
            os.close(descriptor)
            raise CheckpointRejected(self.root, f"{name} is not a regular file")
        return descriptor

    def _entries(self, folder: int, prefix: str) -> list[tuple[str, bool]]:
        """(relative name, is a regular file) of everything under `folder`, links unfollowed."""
        found = []
        with os.scandir(folder) as scan:
            for entry in scan:
                name = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    inner = self._open_in(folder, entry.name, name, _FOLDER_FLAGS)
                    try:
                        found += self._entries(inner, name + "/")
                    finally:
                        os.close(inner)
                else:
                    found.append((name, entry.is_file(follow_symlinks=False)))
        return found


def read_manifest(root: Path) -> Manifest:
    """The parsed manifest of `root`: what it lists (nothing else is checked)."""
    with VerifiedFiles(root) as files:
        return files.manifest


def verify_manifest(root: Path) -> Manifest:
    """Check every file of `root` against its manifest; the manifest if all match."""
    with VerifiedFiles(root) as files:
        files.verify_all()
        return files.manifest


def _open_folder(root: Path) -> int:
    try:
        if stat.S_ISLNK(os.lstat(root).st_mode):
            raise CheckpointRejected(root, SYMLINK_REASON)
        return os.open(root, _FOLDER_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a link since the look
            raise CheckpointRejected(root, SYMLINK_REASON) from None
        reason = "it does not exist" if exc.errno == errno.ENOENT else _unreadable("it", exc)
        raise CheckpointRejected(root, reason) from None


def _unreadable(name: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return f"{name} is missing"
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):  # a link, or a link's folder
        return f"{name} is not a regular file"
    return f"{name} cannot be read ({os.strerror(exc.errno or 0).lower()})"


def _check_name(root: Path, name: str) -> None:
    relative = PurePosixPath(name)
    parts = relative.parts
    if relative.is_absolute() or not parts or ".." in parts or "/".join(parts) != name:
        raise CheckpointRejected(root, f"{MANIFEST_FILE} names a path outside it ({name!r})")
