"""Config files and flags into a checked TrainConfig, with one-line errors.

config = load_config(Path("run.toml"), overrides={"batch_size": 32})
config.batch_size  # 32, whatever the file said
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shardwise.config.rules import two_budgets
from shardwise.config.train_config import TrainConfig
from shardwise.errors import ShardwiseError

# The settings that say how long to train: one is given, and one given now replaces a record's.
BUDGETS = ("max_steps", "max_tokens", "epochs")
# Settings that name files (TrainConfig.to_toml records them absolute).
PATH_SETTINGS = ("data", "job_secret_file")
# A config's settings are numbers, strings and lists of them; far deeper nesting is a mistake or
# an attack, and at ~1,000 levels overflows the parser or whatever prints the value.
MOST_NESTING = 16


@dataclass(frozen=True)
class Record:
    """A run's own settings (`TrainConfig.settings()`), and where they were read: what a
    resumed run starts from."""

    source: str  # "--resume runs/a", for messages
    values: dict[str, Any]


def read_toml(path: Path) -> dict[str, Any]:
    """Read a config file, accepting dashed keys (as on the command line) too.

        read_toml(Path("run.toml"))   # {"batch_size": 32, ...}

    A file that is missing, not a regular file, not UTF-8 TOML, or that nests values more
    than MOST_NESTING levels deep is a ShardwiseError naming it (and the line, where known).
    """
    if not path.is_file():  # missing, a directory, a pipe (reading would block) or a device
        problem = "not a regular file; pass a TOML file" if path.exists() else "file not found"
        raise ShardwiseError(f"--config {path}: {problem}")
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ShardwiseError(f"--config {path}: not valid TOML ({exc})") from None
    except RecursionError:  # tomllib recurses once per level of [ or {
        raw = None
    if raw is None or _nesting(raw) > MOST_NESTING:
        raise ShardwiseError(
            f"--config {path}, line {_first_too_deep_line(text)}: values nested more than "
            f"{MOST_NESTING} levels deep (arrays, inline tables or dotted keys); settings are "
            'flat, e.g. seed = 0 or split_points = ["blocks.1"]'
        )
    return {key.replace("-", "_"): value for key, value in raw.items()}


def _nesting(value: Any) -> int:
    """How many levels deep `value` nests lists and tables, counted without recursing (and
    only as far as one level past the limit)."""
    deepest, pending = 0, [(value, 0)]
    while pending and deepest <= MOST_NESTING:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)
    return deepest


def _first_too_deep_line(text: str) -> int:
    """The first line by which the file nests too deeply: the shortest run of its first lines
    that overflows the parser or parses too deep (a line that leaves an array open parses as
    an error, so an array spread over lines is named where it closes)."""

    def too_deep(count: int) -> bool:
        try:
            return _nesting(tomllib.loads("".join(lines[:count]))) > MOST_NESTING
        except RecursionError:
            return True
        except tomllib.TOMLDecodeError:
            return False

    lines = text.splitlines(keepends=True)
    low, high = 1, len(lines)  # too_deep(high) holds: it is the whole file
    while low < high:
        middle = (low + high) // 2
        if too_deep(middle):
            high = middle
        else:
            low = middle + 1
    return low


def build_config(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate raw values into a TrainConfig, turning pydantic's report into one clear line."""
    _reject_unknown_keys(values, source)
    _reject_two_budgets(values, source)
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ShardwiseError(_describe_validation_error(exc, source)) from None


def load_config(
    path: Path | None,
    overrides: dict[str, Any] | None = None,
    record: Record | None = None,
) -> TrainConfig:
    """Values from the TOML file at `path` (if any), with `overrides` (flags) taking precedence.

        load_config(None, {"max_steps": 400}, Record("--resume runs/a", saved))  # saved, but 400

    With a `record` (a run's own settings, when --resume continues it), every setting the file
    and the flags do not give is the record's: nothing reverts to a default. A budget given now
    (--max-steps, --max-tokens, --epochs) replaces the record's. Files named by the file or the
    flags are taken relative to the working directory and kept absolute from here on (a run
    records them so); one that is missing is refused naming where its path came from.
    """
    values = read_toml(path) if path is not None else {}
    source = f"--config {path}" if path is not None else "config"
    given = {**values, **(overrides or {})}
    recorded = record.values if record is not None else {}
    if given.keys() & set(BUDGETS):
        recorded = {key: value for key, value in recorded.items() if key not in BUDGETS}
    for name in PATH_SETTINGS:
        if name in values and (overrides or {}).get(name) is None:
            _require_file(source, name, values[name])
        elif given.get(name) is None and record is not None and name in recorded:
            _require_file(record.source, name, recorded[name])
        if given.get(name) is not None:
            given[name] = str(Path(given[name]).absolute())
    return build_config({**recorded, **given}, source)


def _require_file(source: str, name: str, value: object) -> None:
    """A path taken from a file or a run's record that names nothing: say where it came from."""
    path = Path(str(value))
    if path.exists():
        return
    where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
    fix = f"; give {_flag(name)} PATH" if source.startswith("--resume") else ""
    raise ShardwiseError(f"{source}: {name} '{value}'{where}: file not found{fix}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _reject_unknown_keys(values: dict[str, Any], source: str) -> None:
    known = set(TrainConfig.model_fields)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ShardwiseError(f"{source}: unknown key '{key}'{hint}")


def _reject_two_budgets(values: dict[str, Any], source: str) -> None:
    # Here as well as in the config's rules, which let a --max-steps of the default pass (every
    # recorded config holds one): of what the user wrote, even --max-steps 300 is refused.
    given = [key for key in BUDGETS if values.get(key) is not None]
    if message := two_budgets(given):
        raise ShardwiseError(f"{source}: {message}")


def _describe_validation_error(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if not field:
        return f"{source}: {message}"
    flag = "--" + field.replace("_", "-")
    return f"{source}: {field} ({flag}) = {first.get('input')!r}: {message}"
