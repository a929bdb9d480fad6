"""The CLI's token-budget batches for your own loop: bucketed, rank-balanced, each sample once.

    loader = TokenLoader(sequences, 4096, replicas=2, rank=0, seed=0, device=torch.device("cpu"))
    for batch in loader:                     # one epoch a pass, as a DataLoader
        logits = model(batch.tokens)
        loss = token_loss_sum(logits, batch.targets) * replicas / batch.step_tokens

Each pass is the next epoch of `TokenBudgetSampler`'s stream, the same plan on every rank: a
step's sequences are taken from a length-sorted window, cut into one batch per rank of equal
predicted cost, so every rank runs the same number of batches and none waits on a longer one.
`batch.step_tokens` is the number of real targets in the whole step over every rank, so the
loss above gives, after DDP's gradient mean, exactly the global token-mean gradient.
An epoch ends with the step that finishes it; when that step had to borrow the first samples
of the next epoch's stream (fewer left than ranks), the next pass starts after them, so over
the passes every sample is seen exactly once per epoch. `set_epoch(e)` jumps to epoch `e`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from shardwise.data.batch import Batch
from shardwise.data.cost import CostModel, rnn_cost
from shardwise.data.loader import make_loader
from shardwise.data.sampler import BatchRequest, SamplerPosition
from shardwise.data.token_sampler import StepPlan, TokenBudgetSampler


class TokenLoader:
    """This replica's token-budget batches, one epoch per pass, moved to `device`."""

    def __init__(
        self,
        sequences: Sequence[Sequence[int] | np.ndarray | torch.Tensor],
        tokens_per_batch: int,
        *,
        replicas: int,
        rank: int,
        seed: int,
        device: torch.device,
        cost_model: CostModel = rnn_cost,
        num_workers: int = 0,
    ) -> None:
        self.sequences = [np.asarray(seq, dtype=np.int64).reshape(-1) for seq in sequences]
        self.lengths = np.fromiter((len(seq) for seq in self.sequences), dtype=np.int64)
        self.sampler = TokenBudgetSampler(
            self.lengths, tokens_per_batch, replicas, rank, 1, seed, cost_model=cost_model
        )
        self.rank, self.device, self.num_workers = rank, device, num_workers
        self.position = SamplerPosition()

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch `epoch` (from its start, unless it is the one under way)."""
        if self.sampler.normalised(self.position).epoch != epoch:
            self.position = SamplerPosition(epoch, 0)

    def __len__(self) -> int:
        """Batches in the next pass (every rank has as many)."""
        return sum(1 for _ in self._epoch_plans(update=False))

    def __iter__(self) -> Iterator[Batch]:
        requests = (
            BatchRequest(plan.batches[self.rank][0], plan.step_tokens, plan.position)
            for plan in self._epoch_plans(update=True)
        )
        for batch in make_loader(self.sequences, requests, self.device, self.num_workers):
            yield batch.to(self.device)

    def _epoch_plans(self, update: bool) -> Iterator[StepPlan]:
        start = self.sampler.normalised(self.position)
        epoch = start.epoch
        for plan in self.sampler.steps_from(start):
            if self.sampler.normalised(start).epoch > epoch:
                break
            yield plan
            start = SamplerPosition(*plan.position)
        if update:
            self.position = start
