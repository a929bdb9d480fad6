"""oneDNN's kernel caches on the host: bounded, and what they keep for each new batch shape.

    bound_kernel_caches()                      # before the process's first oneDNN kernel
    kept = kept_by_new_shapes(step, shapes)    # in the profile: KernelCache(per_shape, most)
    kept.bytes(distinct=13)                    # what 13 distinct batch shapes leave behind

On a CPU, PyTorch's oneDNN kernels (bf16 matmuls and attention, recurrent layers in any
precision) are compiled for each shape they meet and kept in two caches of their own: oneDNN's
primitive cache and ideep's, 1024 entries each by default. A run of variable-length batches
meets a new shape at nearly every step, so what the caches keep grows step after step: a
4-layer bf16 Transformer of 3.5 M parameters kept 13 MiB more for each new width, 660 MiB
after 63 widths, far more than its activations, and never given back. Few of those kernels
are met again, and those that are (every layer of a step shares its shapes) stay within a
small cache, so a process here bounds each cache to `CAPACITY` entries, unless the user set
the variables already (benchmarks/kernel_caches.py measures both sides: kept memory and step
time). The variables are read when a process makes its first kernel, so the bound must come
first: the command line sets it on entry and the workers inherit it; `shardwise.setup` sets it
for an own loop, which is too late where that process already ran a kernel.

What the caches keep is measured, not guessed: the profile (memory/activations.py) runs the
whole call forward and backward at a few shapes it never ran before and reads the resident
memory each leaves behind (`kept_by_new_shapes`): the first new shape's growth, and the most
the caches held once full.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

CAPACITY = 64  # entries in each cache
# oneDNN's primitive cache, and ideep's (PyTorch's oneDNN wrapper) of its own.
VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
# The most new shapes run to find what the caches keep, and when they count as full: after
# `_FULL_AFTER` shapes in a row that each added under a quarter of the first's growth.
MOST_SHAPES = 24
_FULL_AFTER = 3
_FULL = 0.25


def bound_kernel_caches() -> dict[str, str]:
    """Bound each cache at `CAPACITY` entries where the environment does not say otherwise;
    the capacities now in effect for processes started from here, by variable.

    >>> bound_kernel_caches()["LRU_CACHE_CAPACITY"] == os.environ["LRU_CACHE_CAPACITY"]
    True
    """
    for name in VARIABLES:
        os.environ.setdefault(name, str(CAPACITY))
    return kernel_cache_capacities()


def kernel_cache_capacities() -> dict[str, str]:
    """The caches' capacities this process's environment sets ("" where it sets none: the
    libraries' default of 1024)."""
    return {name: os.environ.get(name, "") for name in VARIABLES}


@dataclass(frozen=True)
class KernelCache:
    """What the kernel caches keep: `per_shape` bytes for each new batch shape, up to `most`
    (None: not full after the shapes measured, so it grows on).

    >>> KernelCache(per_shape=10, most=25).bytes(distinct=2), KernelCache(10, 25).bytes(9)
    (20, 25)
    >>> KernelCache(per_shape=10, most=None).bytes(distinct=9)
    90
    """

    per_shape: int = 0
    most: int | None = None

    def bytes(self, distinct: int) -> int:
        grown = self.per_shape * max(distinct, 0)
        return grown if self.most is None else min(grown, self.most)


def kept_by_new_shapes(
    step: Callable[[int, int], None], shapes: Iterable[tuple[int, int]]
) -> KernelCache:
    """What the caches keep: run `step(rows, width)` (a forward and backward) at each of
    `shapes` (at most `MOST_SHAPES`), none of which this process ran before, and read the
    resident memory each leaves behind once freed memory is handed back.

    `per_shape` is the first shape's growth; `most` the growth once the caches are full (the
    last `_FULL_AFTER` shapes each added under a quarter of the first's: a full cache gives
    back an old kernel's memory for each new one), else None.
    """
    # Here, not above: the command line bounds the caches before it imports torch.
    from shardwise.memory.measure import release_freed_memory, status_bytes

    release_freed_memory()
    start = status_bytes("VmRSS") or 0
    grown = [0]
    for rows, width in itertools.islice(shapes, MOST_SHAPES):
        step(rows, width)
        release_freed_memory(collect=False)  # the caches are C++'s: no cycles to collect
        grown.append(max((status_bytes("VmRSS") or 0) - start, 0))
        last = [after - before for before, after in itertools.pairwise(grown[-_FULL_AFTER - 1 :])]
        full = len(grown) > _FULL_AFTER + 1 and all(size <= _FULL * grown[1] for size in last)
        if grown[1] > 0 and full:
            return KernelCache(grown[1], grown[-1])
    return KernelCache(grown[1] if len(grown) > 1 else 0, None)
