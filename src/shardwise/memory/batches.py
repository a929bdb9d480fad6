"""The batches a run has planned, by shape, and the costliest one each data rank will meet.

    shapes = planned_shapes(config, lengths, data_ranks=2, steps=300)
    worst = worst_batches(shapes, cost=profile.whole.bytes)   # per data rank: step and shape

Every rank's sampler plans every step before training (data/sampler.py, token_sampler.py), so
the widest, fullest batch of the run is known in the launcher: with token batching it is the
batch whose rows are longest (a window of long sequences gets few rows but each padded to the
longest), not the mean. A batch's cost is what the caller says (the activation bytes of that
shape), so attention's quadratic term picks the long rows over the many short ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from shardwise.data.packing import pack_rows
from shardwise.data.sampler import FixedBatchSampler


@dataclass(frozen=True)
class BatchShape:
    """A micro-batch as the model sees it: rows x width token slots; `packed`: several
    sequences share a row (the model then builds an attention mask per batch).

    >>> BatchShape(16, 512).slots
    8192
    """

    rows: int
    width: int
    packed: bool = False

    @property
    def slots(self) -> int:
        return self.rows * self.width

    def describe(self) -> str:
        return f"{self.rows} x {self.width}{' packed' if self.packed else ''}"


@dataclass(frozen=True)
class PlannedBatch:
    """One micro-batch of one data rank: its optimizer step (1-based) and its shape."""

    step: int
    shape: BatchShape


def shape_of(work: np.ndarray, indices: tuple[int, ...], packed: bool) -> BatchShape:
    """The shape `collate` (or `pack_collate`) gives the sequences `indices` of `work` inputs.

    >>> shape_of(np.array([5, 3, 2]), (0, 1, 2), packed=True)
    BatchShape(rows=2, width=5, packed=True)
    """
    inputs = work[list(indices)]
    width = int(inputs.max())
    if not packed:
        return BatchShape(len(indices), width)
    rows = pack_rows(inputs, width)
    if len(rows) == len(indices):  # one sequence a row: the padded batch, no mask
        return BatchShape(len(indices), width)
    return BatchShape(len(rows), max(int(inputs[row].sum()) for row in rows), packed=True)


def planned_shapes(
    sampler: object, lengths: np.ndarray, data_ranks: int, steps: int, grad_accum: int
) -> list[list[PlannedBatch]]:
    """Every data rank's micro-batches for `steps` optimizer steps, as the sampler plans them.

    `sampler`: the run's sampler for data rank 0 (train/build.py `build_sampler`); a token
    sampler plans every rank's batches at once, a fixed one is asked again per rank.
    """
    work = np.asarray(lengths, dtype=np.int64) - 1
    if isinstance(sampler, FixedBatchSampler):
        return [list(_fixed(sampler, work, rank, steps, grad_accum)) for rank in range(data_ranks)]
    packed = bool(getattr(sampler, "packing", False))
    found: list[list[PlannedBatch]] = [[] for _ in range(data_ranks)]
    for step, plan in zip(range(1, steps + 1), sampler.steps(), strict=False):  # type: ignore[attr-defined]
        for rank, batches in enumerate(plan.batches):
            found[rank] += [PlannedBatch(step, shape_of(work, b, packed)) for b in batches]
    return found


def _fixed(
    sampler: FixedBatchSampler, work: np.ndarray, rank: int, steps: int, grad_accum: int
) -> Iterator[PlannedBatch]:
    mine = FixedBatchSampler(
        sampler.lengths, sampler.batch_size, sampler.world_size, rank, grad_accum, sampler.seed,
        sampler.start,
    )  # fmt: skip
    for index, request in zip(range(steps * grad_accum), mine, strict=False):
        yield PlannedBatch(index // grad_accum + 1, shape_of(work, request.indices, False))


# Batches whose cost is within this share of a rank's costliest count as reaching its peak: of
# those, the widest (by `cost`) and first is the one named, as a measured peak is first reached.
NEAR_PEAK = 0.02


def worst_batches(
    planned: list[list[PlannedBatch]],
    cost: Callable[[BatchShape], float],
    kept: Callable[[int], float] = lambda distinct: 0,
    shaped: Callable[[BatchShape], BatchShape] = lambda shape: shape,
) -> list[tuple[PlannedBatch, int]]:
    """Per data rank, the planned micro-batch at which it peaks, and how many distinct shapes
    the model had run by then, that one's included.

    A micro-batch costs `cost(shape)` while it runs, and what stays behind grows with the
    distinct shapes the model ran by then: `kept(distinct)` (a host's kernel caches, memory/
    kernels.py), so a later batch can cost more than a wider, earlier one. Of the batches
    within `NEAR_PEAK` of the costliest, the one of the highest `cost` is named, the first on a
    tie: a batch as wide as an earlier one is not the peak for the few kernels kept since.
    `shaped`: the shape the model runs a planned one at (a pipeline's micro-batch, padded to
    its length bucket).

    >>> plans = [[PlannedBatch(1, BatchShape(8, 10)), PlannedBatch(2, BatchShape(2, 60))]]
    >>> worst_batches(plans, cost=lambda s: s.rows * s.width * s.width)[0][0].step
    2
    >>> plans = [[PlannedBatch(step, BatchShape(1, width)) for step, width in enumerate((9, 3, 4))]]
    >>> worst_batches(plans, cost=lambda s: s.width, kept=lambda distinct: 5 * distinct)[0]
    (PlannedBatch(step=2, shape=BatchShape(rows=1, width=4, packed=False)), 3)
    >>> plans = [[PlannedBatch(step, BatchShape(1, w)) for step, w in enumerate((99, 3, 99))]]
    >>> worst_batches(plans, cost=lambda s: 100 * s.width, kept=lambda d: d)[0][0].step
    0
    """
    found = []
    for batches in planned:
        seen: set[BatchShape] = set()
        costs = []
        for batch in batches:
            seen.add(shaped(batch.shape))
            own = cost(batch.shape)
            costs.append((own + kept(len(seen)), own, batch, len(seen)))
        assert costs, "a data rank without planned batches"
        peak = max(total for total, *_ in costs)
        near = [entry for entry in costs if entry[0] >= (1 - NEAR_PEAK) * peak]
        _, _, batch, distinct = max(near, key=lambda entry: (entry[1], -entry[2].step))
        found.append((batch, distinct))
    return found
