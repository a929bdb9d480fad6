"""Token-budget batches from length-sorted windows, balanced across ranks under a cost model.

    sampler = TokenBudgetSampler(lengths, tokens_per_batch=4096, world_size=2, rank=0, seed=0)
    request = next(iter(sampler))   # this rank's first micro-batch, as FixedBatchSampler gives

Every rank plans every step of the whole job the same way, without communicating:

1. The epoch's *stream* is a seeded permutation of all samples, cut into windows of
   `sort_window` samples, each sorted longest first. It depends on the seed, the epoch, the
   lengths and the window, but not on the world size or accumulation, so a position in it
   (samples consumed) means the same thing whatever the number of ranks.
2. A step takes the next *chunk* of the stream: as many samples as fill
   `world_size * grad_accum` batches of `tokens_per_batch` slots each, stopping at the end of a
   window so one step never pads a window's shortest samples to the next window's longest.
   Where full batches would cost unequal amounts (attention, or few long rows per batch), the
   batches are filled to an equal cost instead, a little below the budget (`fill_padded`).
3. The chunk is cut into exactly `world_size * grad_accum` batches of the least maximal cost
   (`split_padded`, or `split_packed` when packing), and the batches are dealt to ranks
   costliest first, each to the least loaded rank. Every rank therefore runs `grad_accum`
   micro-batches every step, always: no rank runs out of data before the others.

Each epoch visits every sample exactly once; nothing is dropped. The one exception to steps
staying inside an epoch: when fewer samples than batches are left at an epoch's end, that step
also takes the first samples of the next epoch's stream, and the position moves into it (with
a dataset barely larger than one step, a sample can then appear twice in that one step).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from shardwise.data.balance import (
    batches_needed,
    deal_to_ranks,
    fill_padded,
    split_packed,
    split_padded,
)
from shardwise.data.cost import CostModel, batch_cost, rnn_cost
from shardwise.data.defaults import DEFAULT_SORT_WINDOW
from shardwise.data.sampler import BatchRequest, SamplerPosition, epoch_permutation
from shardwise.errors import ShardwiseError


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step for every rank: `batches[rank][micro_step]` holds sample indices.

    plan = next(sampler.steps())
    plan.predicted_imbalance   # max over ranks / mean of the predicted per-rank cost
    """

    batches: tuple[tuple[tuple[int, ...], ...], ...]
    rank_costs: tuple[float, ...]
    step_tokens: int  # next-token targets in the whole step, summed over ranks and micro-steps
    position: tuple[int, int]  # (epoch, offset) of the stream once this step is done

    @property
    def predicted_imbalance(self) -> float:
        mean = sum(self.rank_costs) / len(self.rank_costs)
        return max(self.rank_costs) / mean if mean > 0 else 1.0


class TokenBudgetSampler:
    """Yields this rank's `BatchRequest`s, `grad_accum` per step, forever (epoch after epoch).

    sampler = TokenBudgetSampler(lengths, 8192, world_size=4, rank=1, grad_accum=2,
                                 cost_model=cost_model_for("transformer"), packing=True)

    `lengths` are whole sequence lengths (a sequence of L tokens gives L - 1 targets and L - 1
    model inputs). `tokens_per_batch` bounds each batch's model-input slots: rows times the
    batch's width when padded, or the sequences' own tokens when `packing` (the rows then add
    whatever room first-fit packing leaves); a sequence over the budget gets a batch of its own.
    `start` resumes from a `StepPlan.position`, at any world size or accumulation.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        tokens_per_batch: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
        start: SamplerPosition | None = None,
        cost_model: CostModel = rnn_cost,
        packing: bool = False,
        sort_window: int = DEFAULT_SORT_WINDOW,
    ) -> None:
        self.work = np.asarray(lengths, dtype=np.int64) - 1
        self.tokens_per_batch = tokens_per_batch
        self.world_size = world_size
        self.rank = rank
        self.grad_accum = grad_accum
        self.seed = seed
        self.start = start or SamplerPosition()
        self.cost_model = cost_model
        self.packing = packing
        self.sort_window = sort_window
        self._check()
        self._streams: dict[int, np.ndarray] = {}

    @property
    def batches_per_step(self) -> int:
        return self.world_size * self.grad_accum

    def __iter__(self) -> Iterator[BatchRequest]:
        for plan in self.steps():
            for indices in plan.batches[self.rank]:
                yield BatchRequest(indices, plan.step_tokens, plan.position, plan.rank_costs)

    def steps(self) -> Iterator[StepPlan]:
        """Every rank's plan for each step from `start` on; the same on every rank."""
        return self.steps_from(self.start)

    def steps_from(self, position: SamplerPosition) -> Iterator[StepPlan]:
        """Every rank's plan for each step from `position` of the stream on."""
        while True:
            plan = self.plan_step(position)
            yield plan
            position = SamplerPosition(*plan.position)

    def plan_step(self, position: SamplerPosition) -> StepPlan:
        """The step that starts at `position` of the stream."""
        start = self.normalised(position)
        epoch, offset = start.epoch, start.offset
        upcoming = self._upcoming(epoch, offset)
        chunk, groups = self._packed(upcoming) if self.packing else self._padded(upcoming)
        costs = [batch_cost(self.cost_model, self.work[g], self.packing) for g in groups]
        owners = deal_to_ranks(costs, self.world_size, self.grad_accum)
        return StepPlan(
            batches=tuple(
                tuple(tuple(int(i) for i in groups[g]) for g in owned) for owned in owners
            ),
            rank_costs=tuple(sum(costs[g] for g in owned) for owned in owners),
            step_tokens=int(self.work[chunk].sum()),
            position=self._advanced(epoch, offset, len(chunk)),
        )

    # ---- the stream --------------------------------------------------------------------------

    def stream(self, epoch: int) -> np.ndarray:
        """The order in which `epoch` visits the samples: seeded, sorted within windows."""
        if epoch not in self._streams:
            order = epoch_permutation(len(self.work), self.seed, epoch)
            window = np.arange(len(order)) // self.sort_window
            # lexsort is stable and sorts by its last key first: window, then longest first.
            self._streams = {epoch: order[np.lexsort((-self.work[order], window))]}
        return self._streams[epoch]

    def _upcoming(self, epoch: int, offset: int) -> np.ndarray:
        """The stream from here to the first window end that leaves room for every batch."""
        parts: list[np.ndarray] = []
        taken = 0
        while True:
            window_end = min(len(self.work), (offset // self.sort_window + 1) * self.sort_window)
            parts.append(self.stream(epoch)[offset:window_end])
            taken += window_end - offset
            if taken >= self.batches_per_step:
                return np.concatenate(parts)
            epoch, offset = (epoch + 1, 0) if window_end == len(self.work) else (epoch, window_end)

    def _advanced(self, epoch: int, offset: int, count: int) -> tuple[int, int]:
        offset += count
        epoch, offset = epoch + offset // len(self.work), offset % len(self.work)
        return epoch, offset

    # ---- one step ----------------------------------------------------------------------------

    def _padded(self, upcoming: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The step's samples (a prefix of `upcoming`) and its batches, each padded."""
        parts, budget = self.batches_per_step, self.tokens_per_batch
        widths = self.work[upcoming]
        if np.all(widths[:-1] >= widths[1:]):  # inside one window, so already longest first
            stop = fill_padded(widths, parts, budget, self.cost_model)
            if 0 < len(upcoming) - stop < parts <= len(upcoming) - parts:
                # Leave enough for a step of its own rather than cross into the next window.
                stop = len(upcoming) - parts
            chunk = upcoming[:stop]
        else:
            chunk = self._longest_prefix_that_fits(upcoming)
            chunk = chunk[np.argsort(-self.work[chunk], kind="stable")]
        runs = split_padded(self.work[chunk], parts, budget, self.cost_model)
        return chunk, [chunk[run] for run in runs]

    def _longest_prefix_that_fits(self, upcoming: np.ndarray) -> np.ndarray:
        # Fewer samples never need more batches, so bisect on the count that still fits.
        parts, budget = self.batches_per_step, self.tokens_per_batch
        low, high = parts, len(upcoming)
        while low < high:
            middle = (low + high + 1) // 2
            widths = np.sort(self.work[upcoming[:middle]])[::-1]
            if batches_needed(widths, budget, parts) <= parts:
                low = middle
            else:
                high = middle - 1
        return upcoming[:low]

    def _packed(self, upcoming: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The step's samples and its batches, to be packed into rows."""
        parts, budget = self.batches_per_step, self.tokens_per_batch
        # No batch holds more than the budget, except a single sequence over it.
        capped = np.cumsum(np.minimum(self.work[upcoming], budget))
        chunk = upcoming[: int(np.searchsorted(capped, parts * budget, side="right"))]
        groups = split_packed(self.work[chunk], parts, self.cost_model)
        return chunk, [chunk[group] for group in groups]

    # ---- checks ------------------------------------------------------------------------------

    def normalised(self, position: SamplerPosition) -> SamplerPosition:
        """`position` with an offset at the epoch's very end as the next epoch's start."""
        if not 0 <= position.offset <= len(self.work):
            raise ShardwiseError(
                f"resume position {position.offset} is outside this epoch's "
                f"{len(self.work)} sequences; resume with the data the checkpoint was made with"
            )
        return SamplerPosition(*self._advanced(position.epoch, position.offset, 0))

    def _check(self) -> None:
        count = len(self.work)
        if self.work.ndim != 1 or (count and self.work.min() < 1):
            raise ShardwiseError(
                "every sequence needs at least 2 tokens for one next-token target; "
                "drop shorter ones first (fit_to_max_length does)"
            )
        if count < self.batches_per_step:
            raise ShardwiseError(
                f"the training data has {count} sequences, fewer than the {self.batches_per_step} "
                f"batches of one step ({self.world_size} ranks x {self.grad_accum} accumulation "
                "steps); lower --grad-accum or the number of processes"
            )
        if self.tokens_per_batch < 1 or self.sort_window < 1:
            raise ShardwiseError(
                f"tokens per batch ({self.tokens_per_batch}) and sort window "
                f"({self.sort_window}) must be positive; raise them"
            )
        if not 0 <= self.rank < self.world_size or self.grad_accum < 1:
            raise ValueError(f"rank {self.rank} of {self.world_size}, accum {self.grad_accum}")
