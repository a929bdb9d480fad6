"""Config files and flags into a checked TrainConfig, with one-line errors.

config = load_config(Path("run.toml"), overrides={"batch_size": 32})
config.batch_size  # 32, whatever the file said
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shardwise.config.rules import two_budgets
from shardwise.config.train_config import TrainConfig
from shardwise.errors import ShardwiseError


def read_toml(path: Path) -> dict[str, Any]:
    """Read a config file, accepting dashed keys (as on the command line) too."""
    if not path.is_file():  # missing, a directory, a pipe (reading would block) or a device
        problem = "not a regular file; pass a TOML file" if path.exists() else "file not found"
        raise ShardwiseError(f"--config {path}: {problem}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ShardwiseError(f"--config {path}: not valid TOML ({exc})") from None
    return {key.replace("-", "_"): value for key, value in raw.items()}


def build_config(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate raw values into a TrainConfig, turning pydantic's report into one clear line."""
    _reject_unknown_keys(values, source)
    _reject_two_budgets(values, source)
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ShardwiseError(_describe_validation_error(exc, source)) from None


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Values from the TOML file at `path` (if any), with `overrides` (flags) taking precedence."""
    values = read_toml(path) if path is not None else {}
    source = f"--config {path}" if path is not None else "config"
    return build_config({**values, **(overrides or {})}, source)


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
    given = [key for key in ("max_steps", "max_tokens", "epochs") if values.get(key) is not None]
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
