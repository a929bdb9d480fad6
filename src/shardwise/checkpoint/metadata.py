"""Read DCP's `.metadata` without letting it run code, and load tensors only.

    reader = SafeFileSystemReader(path)
    metadata = read_metadata(path)    # raises CheckpointRejected on anything but plain records

DCP stores its metadata as a pickle. Our unpickler resolves a name only when the exact
(module, name) pair is on a fixed list of DCP's record types and torch's plain values, checked
*before* anything is imported or looked up, so dotted names (`operator.attrgetter` under a DCP
module) and every other callable are refused. The metadata must then describe tensors only:
byte items (which DCP loads with `torch.load(weights_only=False)`) and storage transforms are
refused before any shard is opened, and the reader refuses them again when asked to load one.
"""

from __future__ import annotations

import pickle
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from shardwise.checkpoint.errors import CheckpointRejected
from shardwise.checkpoint.manifest import check_regular_file

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
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
        *(("torch", dtype) for dtype in _DTYPES),
    }
)


def read_metadata(path: Path) -> Metadata:
    """The checkpoint's DCP metadata, admitted only if it describes tensors in its own files."""
    metadata = SafeFileSystemReader(path).read_metadata()
    check_tensors_only(metadata, path)
    return metadata


def check_tensors_only(metadata: Metadata, path: Path) -> None:
    """Refuse byte items, storage transforms and files outside the checkpoint directory."""
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            kind = "a byte item" if isinstance(item, BytesStorageMetadata) else type(item).__name__
            raise CheckpointRejected(
                path, f"{METADATA_FILE} lists {key!r} as {kind}; our checkpoints hold tensors only"
            )
    for info in (metadata.storage_data or {}).values():
        if not isinstance(info, _StorageInfo):
            raise CheckpointRejected(path, f"{METADATA_FILE} has a storage record of another kind")
        if info.transform_descriptors:
            raise CheckpointRejected(path, f"{METADATA_FILE} asks for storage transforms")
        relative = PurePosixPath(str(info.relative_path))
        if relative.is_absolute() or ".." in relative.parts or len(relative.parts) != 1:
            raise CheckpointRejected(
                path, f"{METADATA_FILE} points outside the checkpoint ({info.relative_path!r})"
            )
        check_regular_file(path, relative.name)


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader that unpickles metadata by allow-list and loads tensor items only."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Mirrors FileSystemReader.read_metadata, which calls plain pickle.load.
        path = self._get_metadata_path(kwargs.get("rank"))
        check_regular_file(Path(self.path), Path(path).name)
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
            raise CheckpointRejected(
                Path(self.path), f"refused to load {METADATA_FILE} ({exc})"
            ) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointRejected(Path(self.path), f"{METADATA_FILE} is not a DCP record")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        # Second line of defence: byte items are unpickled by DCP with weights_only=False.
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointRejected(Path(self.path), "a shard holds a non-tensor item")
        return super().read_data(plan, planner)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Checked before resolving: super().find_class walks dotted names with getattr.
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"names {module}.{name}, which is not allowed")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("holds a persistent reference, which is not allowed")
