"""What a technique declares about itself: settings, checks, its `Parallelism` entry, its apply
step and its cost terms. Everything written once per technique elsewhere (CLI flags and their
help sections, TOML keys, the has-no-effect rules, `setup()`'s keywords, what a resume may
change, summary.json's record) is derived from these declarations (techniques/__init__.py).

    >>> RECOMPUTE = Technique(
    ...     name="recompute", title="Activation recompute",
    ...     settings=(Setting("recompute", str, "none", "Recompute activations in backward."),),
    ... )
    >>> RECOMPUTE.setting_names
    ('recompute',)

Declarations import no torch (the CLI's `--help` must stay instant): `apply` and `cost` import
their runtime when called. `config` below is anything with the settings as attributes (a
TrainConfig); `parallel/` never imports the config package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Check = Callable[[Any], None]  # config -> None; raises ValueError naming the flags and the fix


def _always(config: Any) -> bool:
    return True


def _nothing(config: Any) -> None:
    return None


def _off(config: Any, layout: Any) -> None:
    return None


@dataclass(frozen=True)
class Setting:
    """One setting: a config field, a TOML key, a `--flag`, and a `setup()` keyword.

    `read_when(config)`: whether a run reads it; where it does not, another value than the
    default is refused as having no effect, naming `ignored_by(config)` (the mode that ignores
    it, as the user would write it), `purpose` and `fix`. `resume`: why a resume that changes it
    is refused (None: it may change), only where the saved run read it.
    """

    name: str
    type: Any
    default: Any
    help: str
    limits: Mapping[str, Any] = field(default_factory=dict)  # pydantic: ge, gt, le, lt
    read_when: Callable[[Any], bool] = _always
    ignored_by: Callable[[Any], str] | None = None
    purpose: str = ""
    fix: str = "drop it"
    resume: str | None = None
    own_loop: bool = True  # a `setup()` keyword (False: settings of the launcher alone)
    metavar: str | None = None
    parse: Callable[[object], object] | None = None  # a flag's or TOML's value before checking

    @property
    def only_in_some_runs(self) -> bool:
        return self.read_when is not _always


@dataclass(frozen=True)
class Footprint:
    """Per-rank memory of one training step before a technique's terms, in bytes by part.

    parts: "parameters", "gradients", "optimizer", "activations", "buffers" (communication),
    "in_flight" (pipeline micro-batches held), "baseline" (the process before training).
    """

    parts: Mapping[str, int]
    layout: Any  # parallel.mesh.Layout (degrees only)
    activations_per_block: int = 0  # the largest block's saved activations for the worst batch
    blocks: int = 1  # blocks (layers) on this rank
    boundary_bytes: int = 0  # one block's output for the worst batch (what recompute keeps)
    split_share: float = 0.0  # of the activations, what a tensor split divides over its ranks

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass(frozen=True)
class Cost:
    """What a technique adds to (positive) or removes from (negative) a rank's step.

    >>> Cost(memory={"activations": -1024}).memory["activations"]
    -1024
    """

    memory: Mapping[str, int] = field(default_factory=dict)  # bytes per rank, by Footprint part
    step_flops_factor: float = 0.0  # extra compute as a share of one forward+backward
    step_bytes: int = 0  # bytes it sends per step per rank


@dataclass(frozen=True)
class Beside:
    """Processes a technique starts on each node beside the training ranks.

    >>> Beside(2, "parameter server(s)", "holding the parameters").line()
    'plus 2 parameter server(s) holding the parameters'
    """

    count: int
    what: str  # as the start line names them: "parameter server(s)"
    doing: str = ""  # what --dry-run says they do
    # How each process of the job (rank or beside) joins its group with them there:
    # (device, timeout_s) -> (its DistEnv, the technique's handle on the run); None: torchrun's.
    join: Callable[[str, float], tuple[Any, Any]] | None = field(default=None, compare=False)
    # Of the job's `world_size` processes, the ranks the run goes on without when they leave.
    expendable: Callable[[int], frozenset[int]] | None = field(default=None, compare=False)

    def line(self) -> str:
        return f"plus {self.count} {self.what} {self.doing}".rstrip()


@dataclass(frozen=True)
class Technique:
    """A technique: its settings and what it does with them (see the module docstring).

    `layout(config, layout)` returns the run's Layout as the technique shapes it (None: it
    does not). `entry(config, layout)` builds its entry of the `Parallelism` (None: off); the
    entry's `describe()` is its `--dry-run` line and `record()` (or its fields) its summary.json
    record.
    `apply(module, entry, layout)` changes this rank's part of the model in `parallelize`
    (after stages and tensor split, before the replicas' wrap). `cost(entry, footprint)` is its
    effect on the rank's memory and step. `warm(entry, layout)` runs its code once on a toy
    module before a rank's memory baseline is taken, so that what the code costs once (imports,
    dispatch tables, caches) is counted in the baseline, as the prediction counts it, and not
    as the run's state; a collective wherever `apply` is one. `frees_within_a_step`: its saving
    is memory freed and allocated again within each step (gathered blocks, recomputed
    activations), which on CPU a rank's allocator must hand back to the system for the saving to
    be real (memory/measure.py `hand_back_large_frees`). `beside(config)`: the processes it
    starts on each node beside the training ranks (a `Beside`; None: none).
    `refuses_resume(saved, saved_world_size, layout)`: why a checkpoint written by a run of
    config `saved` over `saved_world_size` ranks cannot go on under `layout` with the state it
    holds for the technique (None: it can), beyond what its settings' `resume` rules say.
    """

    name: str
    title: str  # the heading of its settings in `shardwise train --help`
    settings: tuple[Setting, ...] = ()
    check: Check = _nothing
    entry: Callable[[Any, Any], Any] = _off
    # How it shapes the run's Layout (e.g. a sharding degree over the data ranks); None: not.
    layout: Callable[[Any, Any], Any] | None = None
    apply: Callable[[Any, Any, Any], Any] | None = None
    cost: Callable[[Any, Footprint], Cost] | None = None
    warm: Callable[[Any, Any], None] | None = None
    frees_within_a_step: bool = False
    beside: Callable[[Any], Beside | None] | None = None
    refuses_resume: Callable[[Any, int, Any], str | None] | None = None

    @property
    def setting_names(self) -> tuple[str, ...]:
        return tuple(setting.name for setting in self.settings)
