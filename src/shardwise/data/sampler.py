"""Deterministic, resumable, rank-aware batch plans.

    sampler = FixedBatchSampler(lengths, batch_size=16, world_size=2, rank=0, seed=0)
    request = next(iter(sampler))   # this rank's 16 indices for step 1, and the step's token count

Every rank draws the same seeded permutation of the whole dataset and takes its own slice of each
global step, so each rank also knows the token count of the *whole* step without communicating.
The position is counted in samples of the epoch, not in steps, which is what lets a run resume
mid-epoch on a different number of ranks without repeating or skipping a sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from shardwise.errors import ShardwiseError


@dataclass(frozen=True)
class BatchRequest:
    """One micro-batch for one rank: which sequences, and facts about its optimizer step.

    `rank_costs` is every rank's predicted compute for the step, from samplers that balance it
    (empty otherwise), so the trainer can log the imbalance it expects next to what it measures.
    """

    indices: tuple[int, ...]
    step_tokens: int
    position: tuple[int, int]  # (epoch, samples of the epoch consumed once this step is done)
    rank_costs: tuple[float, ...] = ()


@dataclass(frozen=True)
class SamplerPosition:
    """Where the data stream stands: epoch and samples of that epoch already consumed."""

    epoch: int = 0
    offset: int = 0


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the dataset in `epoch`; identical on every rank and in every layout."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class FixedBatchSampler:
    """The classic recipe: `batch_size` sequences per rank per micro-step, in a seeded order.

    An epoch takes whole global steps of `batch_size * world_size * grad_accum` sequences; the
    remainder of each epoch (fewer than one global step) is skipped, and since every epoch is a
    new permutation a different remainder is skipped each time.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
        start: SamplerPosition | None = None,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.grad_accum = grad_accum
        self.seed = seed
        self.start = start or SamplerPosition()
        if len(self.lengths) < self.global_batch:
            raise ShardwiseError(
                f"the training data has {len(self.lengths)} sequences, fewer than one global "
                f"batch of {self.global_batch} (batch size {batch_size} x {world_size} ranks x "
                f"{grad_accum} accumulation steps); lower --batch-size or --grad-accum"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum

    def __iter__(self) -> Iterator[BatchRequest]:
        epoch, offset = self.start.epoch, self.start.offset
        while True:
            yield from self._epoch_requests(epoch, offset)
            epoch, offset = epoch + 1, 0

    def _epoch_requests(self, epoch: int, offset: int) -> Iterator[BatchRequest]:
        order = epoch_permutation(len(self.lengths), self.seed, epoch)
        targets_per_seq = self.lengths - 1
        for begin in range(offset, len(order) - self.global_batch + 1, self.global_batch):
            step = order[begin : begin + self.global_batch]
            step_tokens = int(targets_per_seq[step].sum())
            position = (epoch, begin + self.global_batch)
            for micro in range(self.grad_accum):
                first = (micro * self.world_size + self.rank) * self.batch_size
                indices = step[first : first + self.batch_size]
                yield BatchRequest(tuple(int(i) for i in indices), step_tokens, position)
