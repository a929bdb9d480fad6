"""Other settings of the same run on the same devices, predicted, and those that fit a budget.

    fits = changes_that_fit(predictor, config, world_size=4, fits=lambda p: ...)
    fits[:3]   # [("--shard full", 3.1e9), ("--recompute full", 3.5e9), ("--pp 2", 3.8e9)]

Candidates are found, not listed: every choice of every registered technique's settings that
take one of a few values (a Literal: `--shard full`, `--recompute selective`, ...), and every
other split of the same ranks into --pp and --tp stages. Each candidate is the user's config
with that change, checked as the config checks any run, then predicted; pairs of changes are
tried when fewer than `most` single changes fit. Cheapest first: fewest changes, then the least
extra compute and traffic their techniques declare (`Cost.step_flops_factor`, `step_bytes`),
then the lowest peak.
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shardwise.config import TrainConfig
from shardwise.errors import ShardwiseError
from shardwise.memory.predict import MemoryPrediction, MemoryPredictor
from shardwise.techniques import registered

Change = dict[str, Any]


@dataclass(frozen=True)
class Fit:
    """A change that fits: its flags, its prediction, and what it costs a step."""

    change: Change
    prediction: MemoryPrediction
    flags: str

    @property
    def order(self) -> tuple[int, float, int, int]:
        step = max((rank.step for rank in self.prediction.ranks), key=lambda s: s.flops_factor)
        sent = max(rank.step.bytes for rank in self.prediction.ranks)
        return self.flags.count("--"), step.flops_factor, sent, self.prediction.peak.total


def setting_choices(config: TrainConfig) -> Iterator[Change]:
    """Each other value of each registered technique's few-valued (Literal) settings."""
    for technique in registered():
        for setting in technique.settings:
            if typing.get_origin(setting.type) is not typing.Literal:
                continue
            for value in typing.get_args(setting.type):
                if value != getattr(config, setting.name):
                    yield {setting.name: value}


def layout_choices(config: TrainConfig, world_size: int) -> Iterator[Change]:
    """Every other --pp x --tp over the same `world_size` ranks (data ranks: what is left)."""
    for pp in _divisors(world_size):
        for tp in _divisors(world_size // pp):
            if (pp, tp) != (config.pp, config.tp):
                dp = world_size // (pp * tp) if config.dp is not None else None
                yield {"pp": pp, "tp": tp, "dp": dp}


def changes_that_fit(
    predictor: MemoryPredictor,
    config: TrainConfig,
    world_size: int,
    fits: Callable[[MemoryPrediction], bool],
    check: Callable[[TrainConfig], None] = lambda config: None,
    most: int = 3,
) -> list[Fit]:
    """Up to `most` changes of `config` whose prediction `fits`, cheapest first.

    `check`: what else the run must pass on these devices (the preflight's device checks);
    a candidate it or the config refuses is no candidate.
    """
    singles = [*setting_choices(config), *layout_choices(config, world_size)]
    found = _fitting(predictor, config, world_size, singles, fits, check)
    if len(found) < most:
        pairs = [a | b for a, b in itertools.combinations(singles, 2) if not set(a) & set(b)]
        found += _fitting(predictor, config, world_size, pairs, fits, check)
    return sorted(found, key=lambda fit: fit.order)[:most]


def _fitting(
    predictor: MemoryPredictor,
    config: TrainConfig,
    world_size: int,
    changes: list[Change],
    fits: Callable[[MemoryPrediction], bool],
    check: Callable[[TrainConfig], None],
) -> list[Fit]:
    found = []
    for change in changes:
        candidate = _candidate(config, change, world_size, check)
        if candidate is None:
            continue
        try:
            prediction = predictor.predict(candidate, candidate.layout(world_size))
        except ShardwiseError:  # e.g. more stages than the model has pieces
            continue
        if fits(prediction):
            found.append(Fit(change, prediction, flags(config, change)))
    return found


def _candidate(
    config: TrainConfig, change: Change, world_size: int, check: Callable[[TrainConfig], None]
) -> TrainConfig | None:
    """`config` with `change`, checked as a run's config is; None where it is refused."""
    values = config.model_dump() | change
    try:
        candidate = TrainConfig.model_validate(values)
        candidate.layout(world_size)
        check(candidate)
    except (ValidationError, ShardwiseError, ValueError):
        return None
    return candidate


def flags(config: TrainConfig, change: Change) -> str:
    """The change as command-line flags (a layout's data ranks only where the user set them).

    >>> flags(TrainConfig(), {"shard": "full", "pp": 2, "tp": 1, "dp": None})
    '--shard full --pp 2'
    """
    shown = []
    for name, value in change.items():
        if value is None or (name in ("pp", "tp") and value == getattr(config, name)):
            continue
        shown.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(shown)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
