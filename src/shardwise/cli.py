"""The `shardwise` command: parse, validate, hand off. No training logic lives here.

    shardwise train                      # LSTM on Python's own docs, 2 CPU workers or every GPU
    shardwise train --model gru --nproc 4 --precision bf16 --config run.toml

Flags are generated from `TrainConfig`'s fields, so every TOML key is also a flag with the same
help text. Under `torchrun` (RANK in the environment) this process *is* a worker and trains
directly; otherwise it checks the input and starts workers through the elastic agent.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from pathlib import Path

from shardwise.config import TrainConfig, load_config
from shardwise.errors import ShardwiseError

_EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # The working directory is deliberately not put on sys.path: a stray rich.py there would
    # replace the library. --model 'my_module:factory' still finds one (models.import_user_module).
    try:
        return args.handler(args)
    except ShardwiseError as exc:
        print(f"shardwise: error: {exc}", file=sys.stderr, flush=True)
        return _EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("shardwise: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardwise", description="Train sequence models across devices and processes."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a model (defaults: byte-level LSTM on Python's documentation text)",
        description="Train a model. Every flag can also be set in the --config TOML file; "
        "flags override the file.",
    )
    train.add_argument("--config", type=Path, help="TOML file with any of the keys below")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print the layout and, with --pp, each stage's layers, predicted time and memory; "
        "train nothing",
    )
    _add_config_flags(train)
    train.set_defaults(handler=_train)
    return parser


def _train(args: argparse.Namespace) -> int:
    overrides = {
        key: value
        for key, value in vars(args).items()
        if key in TrainConfig.model_fields and value is not None
    }
    config = load_config(args.config, overrides)
    if "RANK" in os.environ:  # started by the user's torchrun: this process is one worker
        from shardwise.job import run_as_torchrun_worker

        run_as_torchrun_worker(config)
        return 0
    return _launch(config, dry=args.dry_run)


def _launch(config: TrainConfig, dry: bool = False) -> int:
    from shardwise.job import plan, run

    if dry:
        print(plan(config))
    else:
        run(config)
    return 0


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in TrainConfig.model_fields.items():
        kind = _base_type(field.annotation)
        shown = f" (default: {field.default})" if field.default is not None else ""
        # The parser's own default stays None so that only flags the user gave override the file.
        options: dict[str, typing.Any] = {"help": f"{field.description}{shown}", "default": None}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        else:
            options["metavar"] = name.rsplit("_", 1)[-1].upper()
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **options)


def _base_type(annotation: object) -> object:
    """`int` for `int | None`, the Literal itself for a Literal."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return rest[0]
    return annotation


if __name__ == "__main__":
    raise SystemExit(main())
