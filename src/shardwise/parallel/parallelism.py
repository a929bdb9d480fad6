"""How one run is parallel: the layout, and one typed entry per technique applied to the model.

    parallelism = Parallelism(layout, sync_strategy("allreduce"), pipeline=PipelineStages(
        cuts=("blocks.2",), schedule=pipeline_schedule("1f1b"), microbatches=4))
    model = parallelize(MyLM(), parallelism, env)
    print(parallelism.describe())     # what --dry-run prints, and summary.json records

It sits between the settings (a TrainConfig, or `shardwise.setup(...)`'s keywords) and
`parallelize`: the one object that says which techniques a model gets and with what, so that
`parallelize` takes it instead of a dozen loose arguments. An entry is None where its technique
is off. The structural techniques (stages, tensor split, sync, precision) have typed fields;
every other registered technique (techniques/) keeps its entry in `entries`, by its name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

import torch

from shardwise.parallel.mesh import Layout
from shardwise.parallel.schedules import SCHEDULES, Schedule
from shardwise.parallel.stages import Autocast
from shardwise.parallel.sync import SyncStrategy
from shardwise.parallel.tensor_parallel import PARTS
from shardwise.techniques import Technique, registered


@dataclass(frozen=True)
class PipelineStages:
    """The model cut into `layout.pp` stages: where they begin and how micro-batches flow."""

    cuts: tuple[str, ...] = ()  # empty: the caller balances the cut first (partition/)
    schedule: Schedule = SCHEDULES["1f1b"]
    microbatches: int = 1
    length_bucket: int = 32  # batch lengths are padded up to a multiple (fewer schedule shapes)

    def describe(self) -> str:
        at = f" starting at {', '.join(self.cuts)}" if self.cuts else ""
        return (
            f"pipeline: stages{at}, {self.schedule.name} schedule, "
            f"{self.microbatches} micro-batches, {self.schedule.stages_per_rank} stage(s) a rank"
        )


@dataclass(frozen=True)
class TensorSplit:
    """Large layers split over `layout.tp` ranks: which kinds of layer may be split."""

    parts: tuple[str, ...] = PARTS

    def describe(self) -> str:
        return f"tensor split: {', '.join(self.parts)} layers"


@dataclass(frozen=True)
class Parallelism:
    """The layout plus one entry per technique; None: that technique is off."""

    layout: Layout
    sync: SyncStrategy
    pipeline: PipelineStages | None = None
    tensor: TensorSplit | None = None
    precision: str = "fp32"
    autocast: Autocast = field(default=contextlib.nullcontext, repr=False, compare=False)
    backward: Any = field(default=torch.Tensor.backward, repr=False, compare=False)
    # The other techniques' entries, by technique name, in the order they apply (techniques/).
    entries: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layout.pp > 1 and self.pipeline is None:
            object.__setattr__(self, "pipeline", PipelineStages())
        if self.layout.tp > 1 and self.tensor is None:
            object.__setattr__(self, "tensor", TensorSplit())
        if self.pipeline is not None:
            self.pipeline.schedule.check(self.pipeline.microbatches, self.layout.pp)

    def entry(self, name: str) -> Any:
        """The entry of the technique called `name` (its typed field, or its place in
        `entries`); None when it is off."""
        if name in _TYPED:
            return getattr(self, name)
        return self.entries.get(name)

    def in_effect(self) -> Iterator[tuple[Technique, Any]]:
        """Each registered technique in effect with its entry, in the order they apply."""
        for technique in registered():
            entry = self.entry(technique.name)
            if entry is not None:
                yield technique, entry

    def with_cuts(self, cuts: Sequence[str]) -> Parallelism:
        """The same, with the pipeline's stages beginning at `cuts`."""
        assert self.pipeline is not None, "cuts need a pipeline"
        return replace(self, pipeline=replace(self.pipeline, cuts=tuple(cuts)))

    def describe(self) -> str:
        """One line per technique in effect, the layout first.

        >>> from shardwise.parallel.sync import sync_strategy
        >>> print(Parallelism(Layout(dp=2), sync_strategy("allreduce")).describe())
        layout: 2 data-parallel x 1 pipeline x 1 tensor-parallel = 2 ranks
        sync: allreduce
        precision: fp32
        """
        layout = self.layout
        lines = [
            f"layout: {layout.dp} data-parallel x {layout.pp} pipeline x {layout.tp} "
            f"tensor-parallel = {layout.world_size} ranks",
            f"sync: {self.sync.name}",
        ]
        lines += [entry.describe() for entry in (self.pipeline, self.tensor) if entry is not None]
        lines.append(f"precision: {self.precision}")
        lines += [_describe(name, entry) for name, entry in self.entries.items()]
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """What summary.json keeps of it: plain values a reader can compare across runs."""
        pipeline = self.pipeline
        return {
            "layout": {"dp": self.layout.dp, "pp": self.layout.pp, "tp": self.layout.tp},
            "sync": self.sync.name,
            "pipeline": None
            if pipeline is None
            else {
                "cuts": list(pipeline.cuts),
                "schedule": pipeline.schedule.name,
                "microbatches": pipeline.microbatches,
                "stages_per_rank": pipeline.schedule.stages_per_rank,
            },
            "tensor": None if self.tensor is None else {"parts": list(self.tensor.parts)},
            "precision": self.precision,
            **{name: _record(entry) for name, entry in self.entries.items()},
        }


# The techniques with a typed field of their own (the others' entries are in `entries`).
_NOT_ENTRIES = {"layout", "autocast", "backward", "entries"}
_TYPED = frozenset(f.name for f in fields(Parallelism)) - _NOT_ENTRIES


def _describe(name: str, entry: Any) -> str:
    describe = getattr(entry, "describe", None)
    return describe() if callable(describe) else f"{name}: {entry}"


def _record(entry: Any) -> Any:
    """An entry as JSON values: its own `record()`, a dataclass's fields, or the value."""
    if callable(getattr(entry, "record", None)):
        return entry.record()
    if is_dataclass(entry) and not isinstance(entry, type):
        return {key: _record(value) for key, value in asdict(entry).items()}
    if isinstance(entry, tuple | list):
        return [_record(value) for value in entry]
    return entry if isinstance(entry, str | int | float | bool | type(None)) else str(entry)
