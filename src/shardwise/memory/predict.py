"""Each rank's peak memory, predicted before the run from a profile and the planned batches.

    predictor = MemoryPredictor(config, corpus, baseline=resident_bytes())
    prediction = predictor.predict(config, layout, cuts=plan.cuts)
    print(prediction.describe())   # one line per rank: the total, its parts, its worst batch

The model is profiled once (memory/activations.py) and each data rank's worst planned batch
found once (memory/batches.py); a prediction then costs no more than arithmetic, so the budget
check can ask about other layouts and settings (memory/alternatives.py) within a second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from shardwise.config import TrainConfig
from shardwise.config.parallelism import parallelism_from
from shardwise.data.prepare import PreparedCorpus
from shardwise.distributed import resolve_device
from shardwise.memory.activations import WIDEST, ActivationProfile, cached_profile
from shardwise.memory.batches import PlannedBatch, planned_shapes, worst_batches
from shardwise.memory.footprint import (
    StepCost,
    base_footprint,
    model_shape,
    ordered,
    with_costs,
)
from shardwise.memory.sizes import format_size
from shardwise.parallel.mesh import Layout
from shardwise.parallel.parallelism import Parallelism
from shardwise.parallel.parallelize import layer_split_for
from shardwise.parallel.tensor_parallel import PARTS
from shardwise.partition import balance
from shardwise.precision import Precision
from shardwise.train.build import build_sampler, model_call, seeded_model, sequence_lengths


@dataclass(frozen=True)
class RankPrediction:
    """One rank's predicted peak: its parts in bytes and the worst batch they are for.

    >>> from shardwise.memory.batches import BatchShape
    >>> parts = {"parameters": 2**20, "baseline": 2**20}
    >>> p = RankPrediction(0, parts, PlannedBatch(3, BatchShape(4, 8)))
    >>> p.total
    2097152
    >>> p.describe()
    'rank 0: 2.0 MiB = parameters 1.0 MiB + baseline 1.0 MiB; worst batch 4 x 8 at step 3'
    """

    rank: int
    parts: Mapping[str, int]
    batch: PlannedBatch
    step: StepCost = field(default_factory=StepCost)  # extra compute and traffic declared

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def with_baseline(self, baseline: int) -> RankPrediction:
        """The same prediction on another ground: a baseline measured in the rank itself."""
        return dataclasses.replace(self, parts={**self.parts, "baseline": baseline})

    def describe(self) -> str:
        parts = " + ".join(
            f"{part} {format_size(size)}" for part, size in self.parts.items() if size
        )
        batch = self.batch
        return (
            f"rank {self.rank}: {format_size(self.total)} = {parts}; worst batch "
            f"{batch.shape.describe()} at step {batch.step}"
        )


@dataclass(frozen=True)
class MemoryPrediction:
    """Every rank's prediction, and how many planned steps the worst batches were found in."""

    ranks: tuple[RankPrediction, ...]
    steps: int
    budget: str = ""  # the budget it was checked against and fits, as --dry-run says it

    @property
    def peak(self) -> RankPrediction:
        """The rank with the highest predicted peak."""
        return max(self.ranks, key=lambda rank: rank.total)

    def describe(self) -> str:
        """What --dry-run shows: a heading, then one line per rank."""
        lines = [
            f"memory per rank, predicted at its worst batch of {self.steps} planned step(s):",
            *(f"  {rank.describe()}" for rank in self.ranks),
        ]
        if self.budget:
            lines.append(f"memory budget: {self.budget}")
        return "\n".join(lines)


class MemoryPredictor:
    """Predicts the memory of `config` (and of other settings for the same model and data).

    `baseline`: a rank's process before training (measured by the caller: memory/measure.py).
    """

    def __init__(self, config: TrainConfig, corpus: PreparedCorpus, baseline: int) -> None:
        self.config = config
        self.corpus = corpus
        self.baseline = baseline
        self.lengths = sequence_lengths(corpus)
        self._profiles: dict[tuple[str, bool], ActivationProfile] = {}
        self._planned: dict[tuple, list[list[PlannedBatch]]] = {}
        self._max_len: int | None = None  # the model's own longest sequence, once built

    def predict(
        self,
        config: TrainConfig,
        layout: Layout,
        cuts: Sequence[str] | None = None,
        ranks: Sequence[int] | None = None,
    ) -> MemoryPrediction:
        """`config`'s prediction over `layout` for `ranks` (default: all), with the pipeline
        cut at `cuts` (default: its split points, else balanced by memory)."""
        profile = self.profile(config)
        # A GPU's allocator holds every byte a saved storage asks for; a host, the pages
        # written (memory/activations.py).
        host = config.device != "cuda" and resolve_device(config.device).type == "cpu"
        profile = profile.on_host() if host else profile.on_device()
        parallelism = parallelism_from(config, layout)
        if parallelism.pipeline is not None and profile.pieces:
            chosen = cuts or config.split_points or self._balanced_cuts(profile, parallelism)
            parallelism = parallelism.with_cuts(chosen)
        # Each data rank's costliest planned micro-batch: what the whole call saves, and what
        # the kernel caches keep of the distinct shapes the model ran by then.
        worst = worst_batches(
            self.planned(config, layout.data_ranks),
            profile.whole.bytes,
            profile.kernels.bytes,
            lambda planned: model_shape(planned, parallelism, self._max_len),
        )
        found = []
        for rank in ranks if ranks is not None else range(layout.world_size):
            placed = dataclasses.replace(layout, rank=rank)
            batch, distinct = worst[placed.data_rank]
            shape = model_shape(batch.shape, parallelism, self._max_len)
            base = base_footprint(profile, placed, parallelism, shape, self.baseline, distinct)
            parts, step = with_costs(base, dataclasses.replace(parallelism, layout=placed))
            found.append(
                RankPrediction(rank, ordered(parts), PlannedBatch(batch.step, shape), step)
            )
        return MemoryPrediction(tuple(found), config.max_steps)

    def profile(self, config: TrainConfig) -> ActivationProfile:
        """The model's activation profile under `config`'s precision (profiled once each)."""
        key = (config.precision, config.packs_rows, config.tp)
        if key not in self._profiles:
            with torch.random.fork_rng():  # the caller's random state stays as it was
                model = seeded_model(self.config, self.corpus.vocab_size)
            contract = model_call(self.config, model)
            self._max_len = getattr(model, "max_len", None)
            # Profiled on the host, as the cut planner profiles: a GPU run's autocast on the
            # host's kernels (fp16, a GPU's alone, as bf16: the same bytes).
            mode = "bf16" if config.precision == "fp16" else config.precision
            autocast = Precision(mode, torch.device("cpu")).autocast
            widest = min(int(self.lengths.max()) - 1, WIDEST)
            split = layer_split_for(model, config.tp, PARTS, contract)  # None without a split
            self._profiles[key] = cached_profile(
                model,
                contract,
                autocast,
                widest,
                config.packs_rows,
                mode,
                split_styles=None if split is None else split.labels,
            )
        return self._profiles[key]

    def planned(self, config: TrainConfig, data_ranks: int) -> list[list[PlannedBatch]]:
        """Every data rank's micro-batches for the run's steps, as its sampler plans them."""
        key = (data_ranks, config.batching, config.fixed_batch_size, config.tokens_per_batch)
        key += (config.grad_accum, config.seed, config.sort_window, config.packs_rows)
        key += (config.max_steps,)
        if key not in self._planned:
            sampler = build_sampler(config, self.lengths, data_ranks, rank=0)
            self._planned[key] = planned_shapes(
                sampler, self.lengths, data_ranks, config.max_steps, config.grad_accum
            )
        return self._planned[key]

    def _balanced_cuts(self, profile: ActivationProfile, parallelism: Parallelism) -> list[str]:
        """Cuts that balance the stages' state (for settings with no profiled cut yet)."""
        assert parallelism.pipeline is not None
        pieces = profile.pieces
        count = parallelism.pipeline.schedule.stage_count(parallelism.layout.pp)
        state = np.array([4 * piece.param_bytes for piece in pieces], dtype=np.float64)
        sizes = balance(len(pieces), count, lambda _part, begin, end: state[begin:end].sum())
        starts = np.cumsum(sizes)[:-1]
        return [pieces[int(start)].names[0] for start in starts]
