"""The held-out loss: a fixed, seeded subset of the held-out sequences, batched by tokens.

    evaluations = Evaluations(config, corpus.eval, model, env)   # before training, alike on all
    evaluated = evaluations.if_due(step, window)    # {"eval_loss": 2.31} every --eval-every steps
    eval_loss = evaluations.loss_at(step)           # the end of the run: None when no tokens

The subset is chosen once from the run's seed, so every evaluation of a run (and every rank)
reads the same sequences, and a run on 200 MB of text does not spend minutes on its 5% held out.
The chosen sequences are sorted by length and cut into batches of at most a rank's token
budget, which keeps padding small; the batches are dealt to the data-parallel replicas in turn
(the sync strategy's `evaluation_share`).
The loss is the token mean over the whole subset, so it does not depend on the number of ranks.

Every rank must call `held_out_loss`: the per-rank sums meet in one all-reduce. In an
asynchronous run the first worker takes every batch: the others may have died, and each would
leave a gap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shardwise.config import TrainConfig
from shardwise.data.batch import collate
from shardwise.distributed import DistEnv, all_reduce_sum
from shardwise.parallel.model import ParallelModel
from shardwise.report.progress import EvalProgress
from shardwise.train.accounting import Window

# Makes the display of one evaluation: (its tokens, its step) -> a context manager.
Display = Callable[[int, int], EvalProgress]

# Mixed into the run's seed so the subset is not drawn from the same stream as the split.
_SUBSET_SEED = 0x5E1EC7


def choose_subset(targets: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """Indices of a seeded random subset whose target counts sum to at most `budget` (0: all).

    choose_subset(np.array([10, 20, 30]), budget=35, seed=0)   # e.g. [0, 1]: 30 targets
    choose_subset(np.array([10, 20, 30]), budget=0, seed=0)    # [0, 1, 2]

    Sequences are taken in a seeded random order; one that would overshoot the budget is passed
    over for the later ones that still fit. Sequences without targets are never chosen.
    """
    has_targets = np.flatnonzero(targets > 0)
    if budget == 0 or int(targets[has_targets].sum()) <= budget:
        return has_targets
    order = np.random.default_rng([seed, _SUBSET_SEED]).permutation(has_targets)
    chosen, left, shortest = [], budget, int(targets[has_targets].min())
    for index in order:
        if targets[index] <= left:
            chosen.append(index)
            left -= int(targets[index])
            if left < shortest:
                break
    return np.sort(np.asarray(chosen, dtype=np.int64))


def length_batches(targets: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices sorted by target count, cut into batches of at most `batch_tokens` padded slots.

    length_batches(np.array([5, 2, 4]), batch_tokens=8)   # [[1, 2], [0]]: 2*4 slots, then 5

    A sequence longer than the budget is a batch of its own.
    """
    order = np.argsort(targets, kind="stable")
    batches: list[np.ndarray] = []
    begin = 0
    for end in range(1, len(order) + 1):
        # Sorted ascending, so the batch's widest row is its last: (rows) x (that width).
        if end == len(order) or (end + 1 - begin) * targets[order[end]] > batch_tokens:
            batches.append(order[begin:end])
            begin = end
    return batches


@dataclass(frozen=True)
class HeldOutSet:
    """The held-out sequences one evaluation reads, in length-sorted batches; alike on all ranks.

    held_out = HeldOutSet.choose(corpus.eval, budget=200_000, seed=0, batch_tokens=4096)
    held_out.tokens, held_out.available   # targets evaluated, of those held out
    """

    batches: tuple[tuple[np.ndarray, ...], ...]
    tokens: int  # next-token targets in the subset
    available: int  # next-token targets in every held-out sequence

    @classmethod
    def choose(
        cls, sequences: Sequence[np.ndarray], budget: int, seed: int, batch_tokens: int
    ) -> HeldOutSet:
        """The seeded subset of `sequences` within `budget` targets (0: all), batched."""
        targets = np.fromiter((len(seq) - 1 for seq in sequences), dtype=np.int64)
        targets = np.maximum(targets, 0)
        chosen = choose_subset(targets, budget, seed)
        batches = length_batches(targets[chosen], batch_tokens)
        return cls(
            batches=tuple(tuple(sequences[chosen[i]] for i in batch) for batch in batches),
            tokens=int(targets[chosen].sum()),
            available=int(targets.sum()),
        )

    @classmethod
    def for_config(cls, config: TrainConfig, sequences: Sequence[np.ndarray]) -> HeldOutSet:
        """The run's subset: --eval-tokens of them, seeded by --seed, batched like training."""
        return cls.choose(sequences, config.eval_tokens, config.seed, eval_batch_tokens(config))

    def batch_tokens(self) -> list[int]:
        """Each batch's targets, in order."""
        return [sum(len(seq) - 1 for seq in batch) for batch in self.batches]


def eval_batch_tokens(config: TrainConfig) -> int:
    """Padded slots per rank per evaluation batch: what one training micro-batch may hold."""
    if config.batching == "fixed":
        return config.fixed_batch_size * config.max_len
    return config.tokens_per_batch


@torch.no_grad()
def held_out_loss(
    model: ParallelModel,
    held_out: HeldOutSet,
    env: DistEnv,
    progress: Callable[[int], None] | None = None,
) -> float | None:
    """Token-mean loss of `model` on `held_out`; None when it holds no tokens.

    held_out_loss(model, held_out, env, progress=lambda done: print(done, "tokens"))

    `progress` is called after each of this rank's batches with the targets evaluated so far
    by every replica, as this rank reckons it (replicas go at about one pace).
    """
    if held_out.tokens == 0:  # every rank knows: no collective to meet in
        return None
    dealt, replicas = model.strategy.evaluation_share(len(held_out.batches), model.layout, env)
    done = np.cumsum(held_out.batch_tokens())
    # A sharded model gathers each block in every forward, a collective of its data ranks: each
    # runs as many forwards as the rank dealt the most, the extra ones counted nowhere.
    lockstep = -(-len(held_out.batches) // replicas) if model.forwards_meet else len(dealt)
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    try:
        for count, index in enumerate(dealt, start=1):
            loss_sum, tokens = _evaluate(model, held_out.batches[index], env)
            totals += torch.tensor([loss_sum, tokens], dtype=torch.float64)
            if progress is not None:
                progress(int(done[min(count * replicas, len(done)) - 1]))
        for _ in range(len(dealt), lockstep):
            _evaluate(model, held_out.batches[dealt[0] if dealt else 0], env)
    finally:
        model.train()
    loss_sum, tokens = all_reduce_sum(totals, env).tolist()
    return loss_sum / tokens if tokens else None


def _evaluate(model: ParallelModel, sequences: Sequence[np.ndarray], env: DistEnv) -> tuple:
    """One batch's summed loss and its tokens (0 on a stage that does not hold the loss)."""
    batch = collate(list(sequences), step_tokens=1).to(env.device)
    loss_sum = model.evaluate(batch.tokens, batch.targets, **batch.model_kwargs(env.device))
    return float(loss_sum), batch.n_tokens if model.owns_loss else 0


class Evaluations:
    """A run's held-out evaluations, on one subset: every --eval-every steps and at the end.

        evaluations = Evaluations(config, corpus.eval, model, env)
        evaluated = evaluations.if_due(step, window, progress.evaluation)   # {} or {"eval_loss": x}
        eval_loss = evaluations.loss_at(config.max_steps)   # the last step's, if just measured

    Every rank must call both at the same steps (each meets in one all-reduce); rank 0 shows it.
    """

    def __init__(
        self,
        config: TrainConfig,
        sequences: Sequence[np.ndarray],
        model: ParallelModel,
        env: DistEnv,
    ) -> None:
        self.held_out = HeldOutSet.for_config(config, sequences)
        self.every = config.eval_every
        self.last_step = config.max_steps
        self.model = model
        self.env = env
        self._last: tuple[int, float | None] | None = None  # (step, its loss)
        self.seconds = 0.0  # every evaluation's, in all

    def due(self, step: int) -> bool:
        """Whether `step` evaluates during training: every --eval-every steps and the last."""
        if self.every == 0 or self.held_out.tokens == 0:
            return False
        return step % self.every == 0 or step == self.last_step

    def if_due(self, step: int, window: Window, display: Display | None = None) -> dict[str, float]:
        """{"eval_loss": loss} after step `step` when it is due, else {}.

        Its time is not training time: `window`'s start moves past it, as for a checkpoint.
        """
        if not self.due(step):
            return {}
        seconds = self.seconds
        loss = self.loss_at(step, display)
        window.started += self.seconds - seconds
        return {} if loss is None else {"eval_loss": loss}

    def loss_at(self, step: int, display: Display | None = None) -> float | None:
        """The held-out loss after step `step`, measured once per step."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        show = display or self._own_display
        began = time.perf_counter()
        with show(self.held_out.tokens, step) as shown:
            loss = held_out_loss(self.model, self.held_out, self.env, shown.update)
            shown.done(loss)
        self.seconds += time.perf_counter() - began
        self._last = (step, loss)
        return loss

    def _own_display(self, tokens: int, step: int) -> EvalProgress:
        return EvalProgress(tokens, step, enabled=self.env.is_main and tokens > 0)
