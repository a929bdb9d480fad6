"""Cut a model into K contiguous stages that balance time and memory, and describe the cut.

    plan = cut_stages(model, num_stages=2, sample_batch=tokens, microbatches=4)
    model = parallelize(model, parallelism.with_cuts(plan.cuts), env)

Like torchgpipe's `balance_by_time` and `balance_by_size`, but with both at once: each piece
costs `time_weight` times its share of the model's time plus the rest times its share of the
model's memory, and the stages are chosen to make the most expensive stage as cheap as possible
(an exact dynamic programme over contiguous cuts). A stage's memory counts its training state
and the activations its schedule keeps in flight: all M micro-batches under GPipe, and
min(M, K - k) on stage k under 1F1B, so 1F1B's early stages get less; under activation
recompute a block holds only what recompute keeps, plus one block's activations made again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from shardwise.data.batch import Batch
from shardwise.distributed import DistEnv, broadcast_object
from shardwise.errors import ShardwiseError
from shardwise.parallel.schedules import pipeline_schedule
from shardwise.parallel.stages import model_pieces, stage_starts
from shardwise.partition.profile import PieceCost, profile_pieces

# How a technique changes the measured piece costs (parallel/recompute.py `piece_costs`).
Adjust = Callable[[list[PieceCost]], list[PieceCost]]


@dataclass(frozen=True)
class CutStage:
    """One stage of a plan: its layers, and predicted time and memory per optimizer step."""

    layer_names: tuple[str, ...]
    time_s: float
    memory_bytes: int
    param_count: int


@dataclass(frozen=True)
class PipelineCut:
    """A cut into stages with predictions; `cuts` is what `parallelize` takes."""

    stages: tuple[CutStage, ...]
    microbatches: int
    schedule: str

    @property
    def cuts(self) -> list[str]:
        return [stage.layer_names[0] for stage in self.stages[1:]]

    @property
    def bubble_bound(self) -> float:
        """The idle share of a balanced pipeline under its schedule ((K-1)/(M+K-1) for these)."""
        return pipeline_schedule(self.schedule).bubble(self.microbatches, len(self.stages))

    @property
    def step_time_s(self) -> float:
        """The slowest stage's micro-batch time times the M + K - 1 slots of a schedule."""
        slowest = max(stage.time_s for stage in self.stages) / self.microbatches
        return slowest * (self.microbatches + len(self.stages) - 1)

    def describe(self) -> str:
        """A table of the stages, for `--dry-run`.

        print(cut_stages(model, 2, tokens).describe())
        """
        header = (
            f"pipeline plan: {_plural(len(self.stages), 'stage')}, "
            f"{_plural(self.microbatches, 'micro-batch', 'micro-batches')}, "
            f"{self.schedule} schedule"
        )
        rows = [("stage", "layers", "params", "compute", "memory")]
        total_s = sum(stage.time_s for stage in self.stages) or 1.0
        for index, stage in enumerate(self.stages):
            rows.append(
                (
                    str(index),
                    _layer_span(stage.layer_names),
                    _count(stage.param_count),
                    f"{stage.time_s / total_s:.0%}",  # a share: profiled times balance the cut,
                    f"{stage.memory_bytes / 2**20:.1f} MiB",  # but are no step-time forecast
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        table = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        footer = (
            f"bubble bound {self.bubble_bound:.0%} ((K-1)/(M+K-1)); "
            f"split points: {', '.join(self.cuts) or '-'}"
        )
        return "\n".join([header, *table, footer])


def cut_stages(
    model: nn.Module,
    num_stages: int,
    sample_batch: Batch | torch.Tensor,
    *,
    microbatches: int = 1,
    schedule: str = "1f1b",
    time_weight: float = 0.5,
    cuts: Sequence[str] | None = None,
    repeats: int = 3,
    adjust: Adjust | None = None,
) -> PipelineCut:
    """Profile `model` on one micro-batch of `sample_batch` and cut it into `num_stages`.

        plan = cut_stages(model, 2, batch, microbatches=4)
        plan.cuts   # e.g. ["blocks.2"]

    `sample_batch` is one step's batch for one pipeline (a `Batch` or its tokens [B, T]); the
    profile runs its first ceil(B / M) rows. `time_weight` 1 balances time only, 0 memory only.
    Given `cuts` (split points), the plan keeps them and only predicts. Asking for more stages
    than the model has pieces, or giving cuts that do not make `num_stages`, raises
    `ShardwiseError`. `adjust`: how a technique changes the measured costs (activation
    recompute: `Recompute.piece_costs`, blocks that hold less and take longer).
    """
    pieces = model_pieces(model)
    if not 1 <= num_stages <= len(pieces):
        raise ShardwiseError(
            f"--pp {num_stages}: {type(model).__name__} has {len(pieces)} pieces to place on "
            f"stages ({', '.join(p.name for p in pieces)}); use --pp between 1 and {len(pieces)}"
        )
    starts = None if cuts is None else stage_starts(model, pieces, cuts, num_stages)
    tokens = sample_batch.tokens if isinstance(sample_batch, Batch) else sample_batch
    micro = tokens[: -(-tokens.shape[0] // microbatches)]
    costs = profile_pieces(model, micro, repeats)
    if adjust is not None:
        costs = adjust(costs)
    return cut_from_costs(costs, num_stages, microbatches, schedule, time_weight, starts)


def cut_from_costs(
    costs: Sequence[PieceCost],
    num_stages: int,
    microbatches: int = 1,
    schedule: str = "1f1b",
    time_weight: float = 0.5,
    starts: Sequence[int] | None = None,
) -> PipelineCut:
    """The balanced plan for already measured `costs` (see `cut_stages`).

    cut_from_costs(profile_pieces(model, tokens), num_stages=2, microbatches=4)

    `starts` ([0, first piece of stage 1, ..., len(costs)]) fixes the cut instead of balancing.
    """

    def in_flight(stage: int) -> int:
        return pipeline_schedule(schedule).in_flight(microbatches, num_stages, stage)

    def memory(stage: int, group: Sequence[PieceCost]) -> int:
        held = sum(c.state_bytes + in_flight(stage) * c.activation_bytes for c in group)
        return held + max((c.recompute_bytes for c in group), default=0)  # one at a time

    total_time = sum(c.time_s for c in costs) or 1.0
    total_memory = memory(0, costs) or 1

    def stage_cost(stage: int, begin: int, end: int) -> float:
        group = costs[begin:end]
        time_share = sum(c.time_s for c in group) / total_time
        return time_weight * time_share + (1 - time_weight) * memory(stage, group) / total_memory

    if starts is None:
        starts = _starts(balance(len(costs), num_stages, stage_cost))
    stages = []
    for stage, (begin, end) in enumerate(itertools.pairwise(starts)):
        group = costs[begin:end]
        stages.append(
            CutStage(
                layer_names=tuple(name for c in group for name in c.names),
                time_s=microbatches * sum(c.time_s for c in group),
                memory_bytes=memory(stage, group),
                param_count=sum(c.param_count for c in group),
            )
        )
    return PipelineCut(tuple(stages), microbatches, schedule)


def balance(count: int, parts: int, cost: Callable[[int, int, int], float]) -> list[int]:
    """Sizes of `parts` non-empty contiguous groups of `count` items minimising the largest cost.

    `cost(part, begin, end)` prices items[begin:end] as part number `part`.

    >>> weights = [1, 1, 1, 3]
    >>> balance(4, 2, lambda part, begin, end: sum(weights[begin:end]))
    [3, 1]
    """
    if not 1 <= parts <= count:
        raise ValueError(f"cannot split {count} items into {parts} non-empty groups")
    inf = float("inf")
    # best[j][i]: the smallest possible largest cost of splitting items[:i] into j groups.
    best = [[inf] * (count + 1) for _ in range(parts + 1)]
    split = [[0] * (count + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for j in range(1, parts + 1):
        for i in range(j, count - (parts - j) + 1):
            for b in range(j - 1, i):
                value = max(best[j - 1][b], cost(j - 1, b, i))
                if value < best[j][i]:
                    best[j][i], split[j][i] = value, b
    sizes, end = [], count
    for j in range(parts, 0, -1):
        sizes.append(end - split[j][end])
        end = split[j][end]
    return sizes[::-1]


def shared_cut(env: DistEnv, make_cut: Callable[[], PipelineCut]) -> PipelineCut:
    """Rank 0's plan on every rank: timings differ between ranks, the cut must not.

        plan = shared_cut(env, lambda: cut_stages(model, 2, batch, microbatches=4))

    Every rank plans (so a mistake raises on all of them alike, instead of leaving the others
    waiting for rank 0), then all take rank 0's plan.
    """
    plan = make_cut()
    return broadcast_object(plan, env)  # type: ignore[return-value]


def profiled_cuts(
    env: DistEnv,
    model: nn.Module,
    stages: int,
    sample: torch.Tensor | None,
    *,
    microbatches: int,
    schedule: str,
    adjust: Adjust | None = None,
) -> list[str]:
    """Where rank 0's profile of `model` on `sample` (default: 8 x 32 zeros) cuts it into
    `stages`, on every rank.

        cuts = profiled_cuts(env, model, 2, None, microbatches=4, schedule="1f1b")
    """
    if sample is None:
        sample = torch.zeros(8, 32, dtype=torch.long)
    plan = shared_cut(
        env,
        lambda: cut_stages(
            model, stages, sample, microbatches=microbatches, schedule=schedule, adjust=adjust
        ),
    )
    return plan.cuts


def _starts(sizes: Sequence[int]) -> list[int]:
    return [0, *itertools.accumulate(sizes)]


def _layer_span(names: Sequence[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]} ({len(names)} layers)"


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"
