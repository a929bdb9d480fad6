"""What `shardwise.run` returns: rank 0's summary as typed fields, and the trained model.

    result = shardwise.run(TrainConfig(model="gru", max_steps=100))
    result.eval_loss, result.tokens_per_s
    model = result.load_model()                      # the trained nn.Module, from its run dir
    model = RunResult.read("runs/a").load_model()    # a finished run, from its folder

summary.json stays the record on disk; `RunResult` is the same keys, typed. Building one from
a summary with a key too many or too few is a bug (the summary and this class drifted apart),
so it fails loudly rather than dropping or inventing a figure.

A run dir is input like any file: it names the code that builds its model, as a pickle names
a class, and a folder. `load_model` obeys neither (see its docstring).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.machinery import PathFinder
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from shardwise.errors import ShardwiseError, first_line
from shardwise.report.summary import SUMMARY_FILE, json_value

if TYPE_CHECKING:
    from torch import nn


# Fields a summary written by an earlier shardwise lacks: read as None (old runs still load).
_ADDED_LATER = ("parallelism", "memory")


@dataclass(frozen=True)
class RunResult:
    """One finished run, as rank 0 summed it up (summary.json), in summary.json's order."""

    world_size: int
    layout: dict[str, int]  # the degrees and world size: {"dp": 2, "pp": 1, "tp": 1, ...}
    stages: tuple[tuple[str, ...], ...] | None  # each pipeline stage's layers; None: one stage
    device: str
    precision: str
    sync: str  # how replicas agreed: allreduce, local-sgd or diloco
    parallelism: dict[str, Any] | None  # Parallelism.record(): layout and each technique
    model: str  # a built-in's name or 'package.module:factory'
    vocab_size: int  # what the model was built with: 256 bytes, or more for token ids
    steps: int
    nonfinite_steps_skipped: int  # steps with a NaN/inf loss or gradient skipped (--on-nonfinite)
    tokens: int
    tokens_per_s: float
    wall_time_s: float  # this attempt's training (after a restart: the last attempt's)
    final_train_loss: float | None  # None: no step was logged
    eval_loss: float | None  # None: no held-out tokens
    peak_rss_bytes: tuple[int, ...]  # per rank
    padding_fraction: float
    imbalance: float
    rank_wait_s: tuple[float, ...]  # per rank
    wait_fraction: float | None
    sync_bytes_per_step: tuple[float, ...]  # per rank: payload handed to collectives, run mean
    sync_exchanges: tuple[int, ...]  # per rank: collectives (DDP buckets) that carried it
    sync_time_s: tuple[float, ...]  # per rank: backward's end wait + exchanges after the step
    compute_time_s: tuple[float, ...]  # per rank: the rest of the steps' time
    eval_tokens: int  # held-out targets eval_loss averages over (a seeded subset, --eval-tokens)
    eval_tokens_available: int  # held-out targets in all (--eval-fraction of the data)
    eval_s: float  # seconds every evaluation took (not counted as training time)
    sync_staleness_histogram: dict[str, int] | None  # async: {staleness: steps}, all ranks
    sync_workers_lost: dict[str, str] | None  # async: {rank: why} of workers that died
    # Per rank: predicted parts and peak, measured baseline and peak, errors (memory/record.py).
    memory: dict[str, Any] | None
    batching: str
    data_notes: str
    resumed_from: Path | None
    resume_notes: tuple[str, ...]
    run_dir: Path
    parameters: int
    sample_text: str
    restarts: tuple[dict[str, Any], ...]  # each: time, rank, reason, resumed_from_step, steps_lost
    wall_time_s_since_launch: float | None  # the whole run, restarts included (our launcher)

    # Not summary keys: what the caller who made this result vouched for (see from_summary).
    _folder: ClassVar[Path | None] = None
    _named_model: ClassVar[str | None] = None

    @classmethod
    def read(cls, run_dir: str | Path) -> RunResult:
        """The finished run in `run_dir`, from its summary.json; `load_model` reads that folder.

        result = RunResult.read("runs/a")
        result.eval_loss, result.load_model()

        A summary.json that is missing, not a regular file, or not a summary of this version of
        shardwise is refused in one line.
        """
        folder = Path(run_dir)
        summary = _read_summary(folder)
        try:
            return cls.from_summary(summary, folder)
        except (ValueError, TypeError, KeyError) as error:
            where, why = folder / SUMMARY_FILE, first_line(error)
            raise ShardwiseError(f"{where}: not a run summary of this shardwise ({why})") from None

    @classmethod
    def from_summary(
        cls,
        summary: Mapping[str, Any],
        run_dir: str | Path | None = None,
        *,
        model: str | None = None,
    ) -> RunResult:
        """The result for rank 0's summary dict; ValueError unless its keys are exactly ours.

        result = RunResult.from_summary(json.loads((run_dir / "summary.json").read_text()), run_dir)
        result = RunResult.from_summary(summary, run_dir, model=config.model)  # shardwise.run's

        `run_dir` is the folder the caller read the summary from (or ran): where `load_model`
        reads the weights, whatever the summary's own run_dir says. `model` is the model the
        caller itself configured, which `load_model` then builds without being told again.
        """
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in summary and name not in _ADDED_LATER]
        unknown = [key for key in summary if key not in names]
        if missing or unknown:
            raise ValueError(
                f"a run summary does not match RunResult: missing {missing}, unknown {unknown}; "
                "the summary's keys and RunResult's fields must change together"
            )
        values = {name: None for name in _ADDED_LATER} | dict(summary)
        per_rank = ("sync_bytes_per_step", "sync_exchanges", "sync_time_s", "compute_time_s")
        for name in ("peak_rss_bytes", "rank_wait_s", *per_rank, "resume_notes", "restarts"):
            values[name] = tuple(values[name])
        if values["stages"] is not None:
            values["stages"] = tuple(tuple(stage) for stage in values["stages"])
        values["run_dir"] = Path(values["run_dir"])
        if values["resumed_from"] is not None:
            values["resumed_from"] = Path(values["resumed_from"])
        result = cls(**values)
        # Frozen, and not fields: equality and to_summary() stay the summary's alone.
        object.__setattr__(result, "_folder", None if run_dir is None else Path(run_dir))
        object.__setattr__(result, "_named_model", model)
        return result

    def to_summary(self) -> dict[str, Any]:
        """The summary dict as summary.json holds it (lists and strings, not tuples and paths).

        assert result.to_summary() == json.loads((result.run_dir / "summary.json").read_text())
        """
        return json.loads(json.dumps(dataclasses.asdict(self), default=json_value))

    def load_model(
        self, factory: Callable[..., nn.Module] | None = None, *, model: str | None = None
    ) -> nn.Module:
        """The trained model, rebuilt and loaded from its run dir's model.safetensors, in eval mode.

        model = RunResult.read("runs/a").load_model()                          # a built-in
        model = RunResult.read("runs/b").load_model(model="my_pkg.lm:build")   # your own model

        A run dir names code to import, as a pickle would: its summary and config.toml name the
        model factory ('my_pkg.lm:build') that built it. A built-in (lstm, gru, transformer)
        needs no import. A factory is imported and called only when the caller names it: here,
        as `model=` (a spec) or `factory=` (the function itself, called with vocab_size= when
        it takes one), or as from_summary's `model=` by whoever configured the run; otherwise
        it is refused in one line naming the factory. No module is imported from inside the
        run dir.

        The weights come from the folder the caller gave (`read`, or from_summary's `run_dir`),
        never from one a summary merely names: a result made from a summary alone reads the run
        dir it names only if that folder's summary.json is this very summary.
        """
        # Imported here: a result that is only read needs neither a corpus nor a model.
        from shardwise.models import BUILTIN_MODELS
        from shardwise.run_dir import WEIGHTS_FILE

        if factory is not None and model is not None:
            raise TypeError("load_model takes factory= or model=, not both")
        folder = self._run_dir_to_read()
        named = model if model is not None else self._named_model
        if factory is None and named is None and self.model not in BUILTIN_MODELS:
            raise ShardwiseError(
                f"run dir {folder} names the model factory {self.model!r}, code that loading "
                "would import and run; if you trust it, name it yourself: "
                f"load_model(model={self.model!r}) or load_model(factory=<that function>)"
            )
        spec = named if named is not None else self.model
        weights = _read_weights(folder / WEIGHTS_FILE)
        vocab_size = _vocab_size(folder, self.vocab_size)
        if factory is not None:
            built, name = _call_factory(factory, vocab_size), getattr(factory, "__qualname__", "")
        else:
            built, name = _build(spec, vocab_size, folder, weights), repr(spec)
        try:
            built.load_state_dict(weights)
        except RuntimeError as error:
            raise ShardwiseError(
                f"run dir {folder}: its weights do not fit model {name} ({first_line(error)}); "
                "name the model that trained them"
            ) from None
        return built.eval()

    def _run_dir_to_read(self) -> Path:
        if self._folder is not None:
            return self._folder
        claimed = self.run_dir
        if _read_summary(claimed) != self.to_summary():
            raise ShardwiseError(
                f"run dir {claimed}: its {SUMMARY_FILE} is not the summary this result was made "
                "from, so it is not that run's folder; load from the folder you read the "
                "summary in: RunResult.read(folder).load_model()"
            )
        return claimed


def _read_file(path: Path) -> bytes:
    """The bytes of a run dir's file: a regular file, not a link, pipe or device, or one line."""
    try:
        # O_NONBLOCK: opening a FIFO waits for a writer that never comes; fstat then refuses it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise ShardwiseError(
            f"{path}: cannot be read ({error.strerror}); a run dir holds plain files, not links"
        ) from None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ShardwiseError(f"{path}: not a regular file (a pipe, socket or device)")
        return handle.read()


def _read_summary(folder: Path) -> dict[str, Any]:
    path = folder / SUMMARY_FILE
    try:
        summary = json.loads(_read_file(path))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise ShardwiseError(f"{path}: not valid JSON ({first_line(error)})") from None
    if not isinstance(summary, dict):
        raise ShardwiseError(f"{path}: not a run summary (a JSON object)")
    return summary


def _read_weights(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(_read_file(path))
    except SafetensorError as error:
        raise ShardwiseError(f"{path}: not a safetensors file ({first_line(error)})") from None


def _vocab_size(folder: Path, value: object) -> int:
    from shardwise.data.vocabulary import MOST_VOCAB

    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MOST_VOCAB:
        raise ShardwiseError(
            f"run dir {folder}: vocab_size {value!r} in its {SUMMARY_FILE} is not a vocabulary "
            f"shardwise builds (1 to {MOST_VOCAB})"
        )
    return value


def _build(spec: str, vocab_size: int, folder: Path, weights: dict[str, Any]) -> nn.Module:
    """Build `spec` for these weights: a built-in's shapes are checked first, a factory's module
    must not come from inside the run dir."""
    import torch

    from shardwise.models import BUILTIN_MODELS, build_model

    if spec in BUILTIN_MODELS:
        # Shapes on the meta device first: a summary's vocab_size of 2**24 would otherwise
        # allocate tens of GB before the weights could say they are not that model's.
        with torch.device("meta"):
            shapes = {
                name: t.shape for name, t in build_model(spec, vocab_size).state_dict().items()
            }
        if shapes != {name: t.shape for name, t in weights.items()}:
            raise ShardwiseError(
                f"run dir {folder}: its weights do not fit model {spec!r} with vocab_size "
                f"{vocab_size} (its {SUMMARY_FILE}'s); name the model that trained them, or the "
                "run dir is damaged"
            )
    else:
        _refuse_import_from(folder, spec)
    return build_model(spec, vocab_size)


def _refuse_import_from(folder: Path, spec: str) -> None:
    """Refuse a factory whose module would be found inside the run dir: a run dir that is the
    working directory (or on sys.path) would otherwise shadow the caller's own module."""
    top = spec.partition(":")[0].strip().partition(".")[0]
    if not top.isidentifier():
        return  # build_model names the malformed spec
    inside = folder.resolve()
    for place in _module_places(top):
        if Path(place).resolve().is_relative_to(inside):
            raise ShardwiseError(
                f"model {spec!r}: {top!r} would be imported from inside the run dir {folder} "
                f"({place}), and loading a run never runs code it holds; install the module or "
                "load from another working directory"
            )


def _module_places(top: str) -> list[str]:
    """Where the top-level module `top` is (or would be) loaded from, without running it: as
    build_model looks, installed first, then in the working directory."""
    loaded = sys.modules.get(top)
    if loaded is not None:
        return [getattr(loaded, "__file__", None) or "", *getattr(loaded, "__path__", [])]
    importlib.invalidate_caches()  # see what the import is about to see
    try:
        found = importlib.util.find_spec(top) or PathFinder.find_spec(top, [os.getcwd()])
    except (ImportError, ValueError):
        return []  # build_model names the failure
    if found is None:
        return []
    origin = found.origin if found.has_location else None
    return [place for place in (origin, *(found.submodule_search_locations or [])) if place]


def _call_factory(factory: Callable[..., nn.Module], vocab_size: int) -> nn.Module:
    from torch import nn

    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        parameters = {}  # type: ignore[assignment]
    built = factory(vocab_size=vocab_size) if "vocab_size" in parameters else factory()
    if not isinstance(built, nn.Module):
        raise ShardwiseError(
            f"load_model(factory=...): it returned {type(built).__name__}, not a torch.nn.Module"
        )
    return built
