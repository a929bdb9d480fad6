"""A rank's memory as measured: its start baseline and its peak while training.

    meter = MemoryMeter.start(device, held=model_bytes(model))   # before the model is prepared
    ...                                                          # train
    meter.figures()   # {"baseline_bytes": ..., "peak_bytes": ..., "reserved_bytes": ...}

On a GPU the peak is torch's allocator peak (`max_memory_allocated`, what tensors held; and
`max_memory_reserved`, what the caching allocator took from the device), its statistics reset at
the start. On CPU it is the process's peak resident memory (VmHWM), reset at the start where the
kernel allows (writing 5 to /proc/self/clear_refs), else the peak since the process began
(`ru_maxrss`). The baseline is what the process held at the start, less `held`: the bytes a
prediction counts part by part although they already exist (on CPU the model as built), so the
prediction's "baseline" part and the measurement stand on the same ground.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in bytes; None where absent."""
    try:
        text = _STATUS.read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    return None


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS; the peak so far where it is unknown)."""
    now = status_bytes("VmRSS")
    return now if now is not None else peak_resident_bytes()


def peak_resident_bytes() -> int:
    """This process's peak resident memory since the last reset (VmHWM), or since it began."""
    peak = status_bytes("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_resident() -> bool:
    """Start VmHWM afresh at the present resident memory; False where the kernel refuses."""
    try:
        _CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


# mallopt's M_MMAP_THRESHOLD (glibc's malloc.h), and the value glibc itself starts from.
_M_MMAP_THRESHOLD = -3
FIXED_MMAP_THRESHOLD = 128 * 1024
KEEP_MALLOC = "SHARDWISE_KEEP_MALLOC"
_HANDING_BACK = False  # whether hand_back_large_frees() fixed it in this process


def hand_back_large_frees() -> bool:
    """Fix glibc's mmap threshold in this process at 128 KiB, its own starting value: every
    larger allocation is then a mapping of its own, returned to the system when freed.

    By default glibc raises the threshold to the size of each mapped block freed, so later large
    tensors come from the heap, which fragments and keeps freed pages: a CPU rank's peak then
    follows the order of frees, and what sharding or recompute frees within a step is not given
    back (sharded ranks held more than DDP's). The price is step time, each large tensor's pages
    faulted in afresh (benchmarks/allocator.py). False, changing nothing, without glibc's
    mallopt, where the process was started with MALLOC_MMAP_THRESHOLD_ of its own, or with
    SHARDWISE_KEEP_MALLOC=1 (glibc's moving default kept: faster steps, a higher peak).
    """
    global _HANDING_BACK
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get(KEEP_MALLOC) == "1":
        return False
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is not None and mallopt(_M_MMAP_THRESHOLD, FIXED_MMAP_THRESHOLD):
        _HANDING_BACK = True
    return _HANDING_BACK


def mmap_threshold() -> int | None:
    """This process's fixed mmap threshold in bytes: set here or by MALLOC_MMAP_THRESHOLD_
    (None: glibc's default, which moves)."""
    given = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
    return int(given) if given.isdigit() else FIXED_MMAP_THRESHOLD if _HANDING_BACK else None


def release_freed_memory(collect: bool = True) -> None:
    """Hand freed heap pages back to the system (glibc's malloc_trim, where there is one), so
    that what is resident is what is held; `collect`: Python's cycles first (gc.collect)."""
    if collect:
        gc.collect()
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


def backward_scratch(forward: Callable[[], tuple[torch.Tensor, Sequence[torch.Tensor]]]) -> int:
    """Bytes a backward holds on the host beyond what its forward left resident, the gradients
    it returns and its seed: a kernel's own buffers. oneDNN's recurrent layers copy their weights
    into their own layout for the backward and write the weights' gradients there first, about
    twice the layer's weights, whatever the batch.

    `forward()` runs a forward and returns its output and the tensors to differentiate. It runs
    twice, measured the second time: the first compiles the shape's kernels (memory/kernels.py
    counts those). 0 on a GPU, with nothing to differentiate, or where the peak cannot be reset.
    """
    for measured in (False, True):
        out, wrt = forward()
        wrt = [tensor for tensor in wrt if tensor.requires_grad]
        if out.device.type != "cpu" or not out.requires_grad or not wrt:
            return 0
        seed = torch.ones_like(out)
        release_freed_memory(collect=False)
        if measured and not reset_peak_resident():
            return 0
        before = resident_bytes()
        grads = torch.autograd.grad(out, wrt, seed)
        if measured:
            held = sum(grad.untyped_storage().nbytes() for grad in grads)
            return max(peak_resident_bytes() - before - held - seed.untyped_storage().nbytes(), 0)
        del out, grads, seed
    return 0


_PAGE = 4096


def touched_bytes(storage: torch.UntypedStorage) -> int:
    """Of a host storage's bytes, those in pages resident now (mincore): the pages a kernel
    wrote, where the storage is a fresh mapping (a large one under a fixed mmap threshold); a
    storage in reused heap pages reads as written. A GPU's storage, or a system without
    mincore: all of them.

    >>> written = torch.ones(1 << 20).untyped_storage()  # 4 MiB, every page written
    >>> touched_bytes(written) == written.nbytes()
    True
    """
    nbytes = storage.nbytes()
    pointer = storage.data_ptr()
    if storage.device.type != "cpu" or nbytes == 0 or pointer == 0:
        return nbytes
    mincore = _mincore()
    if mincore is None:
        return nbytes
    start = pointer - pointer % _PAGE
    pages = -(-(pointer + nbytes - start) // _PAGE)
    resident = (ctypes.c_ubyte * pages)()
    if mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * _PAGE), resident) != 0:
        return nbytes
    return min(sum(page & 1 for page in resident) * _PAGE, nbytes)


@functools.cache
def _mincore() -> Any:  # a ctypes function, or None
    name = ctypes.util.find_library("c")
    found = getattr(ctypes.CDLL(name), "mincore", None) if name else None
    if found is not None:
        found.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return found


def model_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage once), on any device."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass
class MemoryMeter:
    """One rank's start baseline and, when asked, its peak since the start."""

    device: torch.device
    baseline_bytes: int
    since_start: bool  # False: the CPU peak counts from the process's start (no reset)
    before_bytes: int = 0  # the process's peak before the start (what the reset forgot)

    @classmethod
    def start(cls, device: torch.device, held: int = 0) -> MemoryMeter:
        """Reset the peak and take the baseline: the process now, less `held` bytes.

        `held`: what already exists but a prediction counts as its own parts (on CPU, the model
        as built; on a GPU nothing yet, the model is still on the host).
        """
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = int(torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)
            return cls(device, int(torch.cuda.memory_allocated(device)), True, before)
        before = peak_resident_bytes()
        reset = reset_peak_resident()
        return cls(device, max(resident_bytes() - held, 0), reset, before)

    def peak_bytes(self) -> int:
        """The peak since the start: allocated on a GPU, resident on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_resident_bytes()

    def lifetime_peak_bytes(self) -> int:
        """The peak since the process began, as before the start's reset (peak_rss_bytes)."""
        return max(self.before_bytes, self.peak_bytes())

    def figures(self) -> dict[str, int | bool | None]:
        """The measured figures summary.json keeps per rank (reserved: a GPU's, else None)."""
        reserved = None
        if self.device.type == "cuda":
            reserved = int(torch.cuda.max_memory_reserved(self.device))
        return {
            "baseline_bytes": self.baseline_bytes,
            "peak_bytes": self.peak_bytes(),
            "reserved_bytes": reserved,
            "peak_since_start": self.since_start,
        }
