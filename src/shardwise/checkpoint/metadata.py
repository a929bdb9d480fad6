"""Read DCP's `.metadata` without letting it run code, and hand DCP only records we built.

    metadata = read_metadata(path)    # CheckpointRejected on anything but plain tensor records

DCP stores its metadata as a pickle. Our unpickler resolves a name only when the exact
(module, name) pair is on a fixed list of DCP's record types and torch's plain values, checked
*before* anything is imported or looked up, so dotted names (`operator.attrgetter` under a DCP
module) and every other callable are refused. What the pickle builds is then only read, never
handed on: every record DCP gets is rebuilt from checked plain values (a shard's file name is
an exact `str`, one name inside the checkpoint; a tensor's dtype a torch dtype; its chunks
tile it). An unpickled object can claim anything through its internal state - a PosixPath
that prints one name and opens another - so none of them reaches DCP.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from shardwise.checkpoint.errors import CheckpointRejected
from shardwise.checkpoint.verified import VerifiedFiles
from shardwise.errors import first_line

METADATA_FILE = ".metadata"

_DCP_RECORDS = "torch.distributed.checkpoint.metadata"
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}

# Every global a DCP metadata pickle of ours refers to; nothing here runs code when called.
ALLOWED_GLOBALS = frozenset(
    {
        (_DCP_RECORDS, "Metadata"),
        (_DCP_RECORDS, "TensorStorageMetadata"),
        (_DCP_RECORDS, "BytesStorageMetadata"),  # read so it can be refused by name below
        (_DCP_RECORDS, "TensorProperties"),
        (_DCP_RECORDS, "ChunkStorageMetadata"),
        (_DCP_RECORDS, "MetadataIndex"),
        (_DCP_RECORDS, "StorageMeta"),
        (_DCP_RECORDS, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),  # DCP records the checkpoint's path; read, then dropped
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
        *(("torch", dtype) for dtype in _DTYPES),
    }
)


def read_metadata(path: Path) -> Metadata:
    """The checkpoint's DCP metadata, checked against its digest, then rebuilt from plain values."""
    with VerifiedFiles(path) as files:
        return parse_metadata(path, files.read(METADATA_FILE))


def parse_metadata(path: Path, data: bytes) -> Metadata:
    """DCP metadata from the bytes of `.metadata`: tensor records in this checkpoint's files."""
    try:
        raw = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:
        # Only allow-listed constructors ran: whatever they raised (KeyError from an unknown
        # layout name, TypeError from a malformed torch.Size) is the file's fault, not ours.
        reason = first_line(exc, with_type=not isinstance(exc, pickle.UnpicklingError))
        raise CheckpointRejected(path, f"refused to load {METADATA_FILE} ({reason})") from None
    if type(raw) is not Metadata:
        raise CheckpointRejected(path, f"{METADATA_FILE} is not a DCP record")
    return _Rebuild(path).metadata(raw)


class _Rebuild:
    """Fresh DCP records from an unpickled one, each value checked for type and range."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def refuse(self, what: str) -> CheckpointRejected:
        return CheckpointRejected(self.path, f"{METADATA_FILE} {what}")

    def metadata(self, raw: Metadata) -> Metadata:
        items = raw.state_dict_metadata
        if type(items) is not dict:
            raise self.refuse("holds no table of tensors")
        tensors = {self.key(key): self.tensor(key, item) for key, item in items.items()}
        stored = raw.storage_data
        if type(stored) is not dict:
            raise self.refuse("holds no table of shard files")
        storage = dict(self.storage(index, info) for index, info in stored.items())
        for key, item in tensors.items():
            for chunk in item.chunks:
                if MetadataIndex(key, chunk.offsets) not in storage:
                    raise self.refuse(f"says nothing of where part of {key!r} is stored")
        # planner_data (key paths) and storage_meta (the saving run's path and ids) are not
        # needed to load: not handed on.
        return Metadata(tensors, storage_data=storage, storage_meta=StorageMeta())

    def key(self, key: object) -> str:
        if type(key) is not str:
            raise self.refuse(f"names a tensor by a {type(key).__name__}")
        return key

    def tensor(self, key: object, item: object) -> TensorStorageMetadata:
        if type(item) is not TensorStorageMetadata:
            kind = "a byte item" if isinstance(item, BytesStorageMetadata) else type(item).__name__
            raise self.refuse(f"lists {key!r} as {kind}; our checkpoints hold tensors only")
        properties = item.properties
        if type(properties) is not TensorProperties or not isinstance(
            properties.dtype, torch.dtype
        ):
            raise self.refuse(f"gives {key!r} no dtype")
        if properties.layout is not torch.strided:
            raise self.refuse(f"gives {key!r} the layout {properties.layout!r}, not strided")
        size = self.size(key, item.size)
        chunks = item.chunks
        if type(chunks) is not list or not chunks:
            raise self.refuse(f"gives {key!r} no chunks")
        built = [self.chunk(key, size, chunk) for chunk in chunks]
        self.check_tiling(key, size, built)
        return TensorStorageMetadata(TensorProperties(dtype=properties.dtype), size, built)

    def size(self, key: object, value: object, length: int | None = None) -> torch.Size:
        # A torch.Size holds Python ints only; its length and signs are what can lie.
        if type(value) is not torch.Size or (length is not None and len(value) != length):
            raise self.refuse(f"gives {key!r} a malformed shape")
        if any(dim < 0 for dim in value):
            raise self.refuse(f"gives {key!r} a negative size")
        return torch.Size(tuple(int(dim) for dim in value))

    def chunk(self, key: object, size: torch.Size, chunk: object) -> ChunkStorageMetadata:
        if type(chunk) is not ChunkStorageMetadata:
            raise self.refuse(f"gives {key!r} a chunk of another kind")
        offsets = self.size(key, chunk.offsets, len(size))
        sizes = self.size(key, chunk.sizes, len(size))
        if any(o + s > dim for o, s, dim in zip(offsets, sizes, size, strict=True)):
            raise self.refuse(f"gives {key!r} a chunk outside its shape")
        return ChunkStorageMetadata(offsets, sizes)

    def check_tiling(self, key: object, size: torch.Size, chunks: list) -> None:
        """The chunks cover the tensor once: no part left as it was, none loaded twice."""
        if sum(math.prod(chunk.sizes) for chunk in chunks) != math.prod(size):
            raise self.refuse(f"gives {key!r} chunks that do not cover it")
        for i, a in enumerate(chunks):
            if any(_overlap(a, b) for b in chunks[i + 1 :]):
                raise self.refuse(f"gives {key!r} overlapping chunks")

    def storage(self, index: object, info: object) -> tuple[MetadataIndex, _StorageInfo]:
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            raise self.refuse("has a storage record of another kind")
        key = self.key(index.fqn)
        offset = None if index.offset is None else self.size(key, index.offset)
        if info.transform_descriptors:
            raise self.refuse("asks for storage transforms")
        name = info.relative_path
        if type(name) is not str:
            # Not even str(name): an unpickled path prints whatever its state says.
            raise self.refuse(f"names the file of {key!r} by a {type(name).__name__}, not a name")
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise self.refuse(f"points outside the checkpoint ({name!r})")
        begin, length = info.offset, info.length
        if type(begin) is not int or type(length) is not int or begin < 0 or length < 0:
            raise self.refuse(f"gives {key!r} a malformed place in {name}")
        built = MetadataIndex(key, offset)
        return built, _StorageInfo(relative_path=str(name), offset=begin, length=length)


def _overlap(a: ChunkStorageMetadata, b: ChunkStorageMetadata) -> bool:
    """Whether two chunks share an element (boxes that overlap along every dimension)."""
    if not math.prod(a.sizes) or not math.prod(b.sizes):
        return False
    spans = zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
    return all(max(oa, ob) < min(oa + sa, ob + sb) for oa, sa, ob, sb in spans)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Checked before resolving: super().find_class walks dotted names with getattr.
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"names {module}.{name}, which is not allowed")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("holds a persistent reference, which is not allowed")
