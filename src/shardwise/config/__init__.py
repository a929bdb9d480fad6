"""Typed training configuration: TOML file, then command-line flags on top.

    config = load_config(Path("run.toml"), overrides={"batch_size": 32})
    config.batch_size  # 32, whatever the file said

`train_config` holds the fields and their help, `rules` what fields demand of each other,
`files` reading TOML and flags into a checked config, `sections` the help's grouping.
"""

from shardwise.config.files import Record, build_config, load_config, read_toml
from shardwise.config.rules import parse_endpoint
from shardwise.config.sections import SECTIONS
from shardwise.config.train_config import TrainConfig

__all__ = [
    "SECTIONS",
    "Record",
    "TrainConfig",
    "build_config",
    "load_config",
    "parse_endpoint",
    "read_toml",
]
