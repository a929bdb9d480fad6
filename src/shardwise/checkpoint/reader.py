"""DCP's storage reader for a checkpoint: tensors only, from bytes checked as they were read.

    reader = VerifiedReader(files, metadata)   # VerifiedFiles, and parse_metadata's records
    dcp.load(state, checkpoint_id=files.root, storage_reader=reader)

DCP's own FileSystemReader opens each shard by the path the metadata gives and casts what it
finds into the live tensor. This one reads each shard the plan needs once, through
`VerifiedFiles` (so the bytes are the ones the manifest seals, and no path from the pickle is
ever opened), unpickles each tensor with `torch.load(weights_only=True)`, and refuses a tensor
whose dtype or shape is not what the metadata says and the live model holds: a float weight
is never silently filled from an int64 one.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from shardwise.checkpoint.errors import CheckpointRejected
from shardwise.checkpoint.metadata import METADATA_FILE
from shardwise.checkpoint.verified import VerifiedFiles
from shardwise.errors import first_line


class VerifiedReader(FileSystemReader):
    """Loads `metadata`'s tensors from `files`; a shard that is not what was sealed is refused."""

    def __init__(self, files: VerifiedFiles, metadata: Metadata) -> None:
        super().__init__(files.root)
        self.files = files
        self.metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self.metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return self.metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            # Byte items would be unpickled by torch.load(weights_only=False): never.
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointRejected(self.files.root, "a shard holds a non-tensor item")
            name = self.storage_data[item.storage_index].relative_path
            by_file.setdefault(name, []).append(item)
        for name, items in by_file.items():
            data = memoryview(self.files.read(name))
            for item in items:
                self._load(name, data, item, planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _load(self, name: str, data: memoryview, item: ReadItem, planner: LoadPlanner) -> None:
        key = item.storage_index.fqn
        where = self.storage_data[item.storage_index]
        if where.offset + where.length > len(data):
            raise CheckpointRejected(self.files.root, f"{name} ends before {key!r} does")
        tensor = self._tensor(name, key, data[where.offset : where.offset + where.length])
        described = self.metadata.state_dict_metadata[key]
        assert isinstance(described, TensorStorageMetadata)  # parse_metadata admits no other
        chunk = next(c for c in described.chunks if c.offsets == item.storage_index.offset)
        if tensor.dtype != described.properties.dtype or tensor.shape != chunk.sizes:
            raise CheckpointRejected(
                self.files.root,
                f"{name} holds {key!r} as {_kind(tensor.dtype, tensor.shape)}, {METADATA_FILE} "
                f"says {_kind(described.properties.dtype, chunk.sizes)}",
            )
        target = planner.resolve_tensor(item).detach()
        if target.dtype != tensor.dtype:
            raise CheckpointRejected(
                self.files.root,
                f"{key!r} is {_dtype(tensor.dtype)} in the checkpoint, {_dtype(target.dtype)} "
                "in this model",
            )
        part = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        if target.size() != part.size():
            raise CheckpointRejected(
                self.files.root, f"{key!r} has another shape in the checkpoint than in this model"
            )
        target.copy_(part)
        planner.commit_tensor(item, target)

    def _tensor(self, name: str, key: str, data: memoryview) -> torch.Tensor:
        try:
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            # weights_only: the unpickler runs nothing but tensor rebuilding, so whatever it
            # raises is about these bytes.
            raise CheckpointRejected(
                self.files.root,
                f"{name} does not hold a tensor for {key!r} ({first_line(exc, with_type=True)})",
            ) from None
        if type(tensor) is not torch.Tensor:
            raise CheckpointRejected(
                self.files.root, f"{name} holds a {type(tensor).__name__} for {key!r}"
            )
        return tensor


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kind(dtype: torch.dtype, shape: torch.Size) -> str:
    return f"{_dtype(dtype)} {list(shape)}"
