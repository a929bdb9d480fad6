"""The registered techniques, and everything derived from their declarations.

    >>> [technique.name for technique in registered()][:2]
    ['pipeline', 'tensor']
    >>> settings()["sync_every"].default
    8

Adding a technique is one module declaring a `Technique` (techniques/base.py) and one line in
BUILT_IN below; a package of your own registers one through the entry point group
`shardwise.techniques` (`[project.entry-points."shardwise.techniques"] name = "pkg.mod:TECHNIQUE"`).
Its settings then become config fields, TOML keys and flags under its own heading in
`shardwise train --help`, `setup()` keywords, has-no-effect rules and resume rules; its entry
joins the `Parallelism` (--dry-run, summary.json) and its apply step `parallelize`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any

from shardwise.errors import ShardwiseError
from shardwise.techniques.base import Beside, Cost, Footprint, Setting, Technique
from shardwise.techniques.pipeline import PIPELINE
from shardwise.techniques.precision import PRECISION
from shardwise.techniques.recompute import RECOMPUTE
from shardwise.techniques.sharding import SHARDING
from shardwise.techniques.sync import SYNC
from shardwise.techniques.tensor_split import TENSOR_SPLIT

# In the order parallelize applies them and --dry-run lists them.
BUILT_IN: tuple[Technique, ...] = (
    PIPELINE,
    TENSOR_SPLIT,
    RECOMPUTE,
    SHARDING,
    SYNC,
    PRECISION,
)
GROUP = "shardwise.techniques"


@functools.cache
def registered() -> tuple[Technique, ...]:
    """The built-in techniques, then those installed packages register (entry points)."""
    found = list(BUILT_IN)
    for point in sorted(entry_points(group=GROUP), key=lambda point: point.name):
        technique = point.load()
        if not isinstance(technique, Technique):
            raise ShardwiseError(
                f"entry point {point.name} = {point.value} in {GROUP} is not a Technique"
            )
        found.append(technique)
    names = [technique.name for technique in found]
    if len(set(names)) != len(names):
        raise ShardwiseError(f"two techniques share a name among {names}")
    return tuple(found)


@functools.cache  # read on every config validation; the registry is fixed once read
def settings() -> dict[str, Setting]:
    """Every technique's settings by name (each name belongs to one technique)."""
    found: dict[str, Setting] = {}
    for technique in registered():
        for setting in technique.settings:
            if setting.name in found:
                raise ShardwiseError(f"setting {setting.name} is declared twice")
            found[setting.name] = setting
    return found


def sections() -> dict[str, tuple[str, ...]]:
    """`shardwise train --help`'s heading per technique with settings, and their names."""
    return {t.title: t.setting_names for t in registered() if t.settings}


def piece_costs(entries: Iterable[Any]) -> tuple[Callable[[list], list] | None, str]:
    """How the techniques in effect change the pipeline cut planner's measured piece costs,
    composed (an entry with a `piece_costs(costs)` method changes them: recompute's blocks hold
    less and take longer), and a key naming them (a remembered cut is reused only alike).

    >>> piece_costs([None, "fp32"])
    (None, '')
    """
    adjusting = [entry for entry in entries if callable(getattr(entry, "piece_costs", None))]
    if not adjusting:
        return None, ""

    def adjust(costs: list) -> list:
        for entry in adjusting:
            costs = entry.piece_costs(costs)
        return costs

    return adjust, ";".join(repr(entry) for entry in adjusting)


def owner(name: str) -> Technique:
    """The technique that declares setting `name`."""
    return next(t for t in registered() if name in t.setting_names)


__all__ = [
    "BUILT_IN",
    "Beside",
    "Cost",
    "Footprint",
    "Setting",
    "Technique",
    "expendable_ranks",
    "freeing_within_a_step",
    "joining",
    "owner",
    "piece_costs",
    "processes_beside",
    "registered",
    "sections",
    "settings",
]


def freeing_within_a_step(config: Any, layout: Any) -> list[str]:
    """The techniques in effect for `config` whose saving is memory freed within each step
    (their `frees_within_a_step`), by name."""
    return [
        technique.name
        for technique in registered()
        if technique.frees_within_a_step and technique.entry(config, layout) is not None
    ]


def processes_beside(config: Any) -> tuple[Beside, ...]:
    """The processes the techniques in effect start on each node beside the training ranks."""
    found = (technique.beside(config) for technique in registered() if technique.beside)
    return tuple(beside for beside in found if beside is not None and beside.count > 0)


def joining(config: Any) -> Callable[[str, float], tuple[Any, Any]] | None:
    """How each process of `config`'s job joins its group, where processes beside the ranks
    change it (their `Beside.join`); None: torchrun's group as it is."""
    joins = [beside.join for beside in processes_beside(config) if beside.join is not None]
    if len(joins) > 1:
        raise ShardwiseError("two techniques in effect each start processes of their own group")
    return joins[0] if joins else None


def expendable_ranks(config: Any, world_size: int) -> frozenset[int]:
    """The ranks of a `world_size`-process job that `config`'s run goes on without."""
    found: frozenset[int] = frozenset()
    for beside in processes_beside(config):
        if beside.expendable is not None:
            found |= beside.expendable(world_size)
    return found
