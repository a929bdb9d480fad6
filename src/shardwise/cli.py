"""The `shardwise` command: parse, validate, hand off. No training logic lives here.

    shardwise train                      # LSTM on Python's own docs, 2 CPU workers or every GPU
    shardwise train --model gru --nproc 4 --precision bf16 --config run.toml
    shardwise train --run-dir runs/a --resume     # continue runs/a from its newest checkpoint

Flags are generated from `TrainConfig`'s fields, so every TOML key is also a flag with the same
help text, grouped under the config's sections. Under `torchrun` (RANK in the environment) this
process *is* a worker and trains directly; otherwise it checks the input and starts workers
through the elastic agent.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import types
import typing
from pathlib import Path

import shardwise
from shardwise.config import SECTIONS, Record, TrainConfig, load_config, read_toml
from shardwise.errors import ShardwiseError, print_error
from shardwise.handoff import EXIT_INTERRUPTED, Preempted
from shardwise.memory.kernels import bound_kernel_caches

# Exit statuses (README, "Exit status"): 0 done, 2 an error, 75 preempted with a checkpoint
# (--resume continues), 128 + N stopped by signal N before one was saved, 130 aborted (Ctrl-C).
_EXIT_USER_ERROR = 2
# What a bare `--resume` parses to: "the run dir's newest verified checkpoint" (see _train).
_LATEST = "latest checkpoint of --run-dir"
# Metavars by field type, so `--help` says what kind of value a flag takes.
_METAVARS: dict[object, str] = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    bound_kernel_caches()  # before any kernel here, and for every process started from here
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unknown_argument(unknown[0], _flags(parser)))
    # The working directory is deliberately not put on sys.path: a stray rich.py there would
    # replace the library. --model 'my_module:factory' still finds one (models.import_user_module).
    try:
        return args.handler(args)
    except ShardwiseError as exc:
        print_error(exc)
        return _EXIT_USER_ERROR
    except Preempted as stop:  # SIGTERM or Ctrl-C: stopped after a step, as it says
        print(f"shardwise: {stop}", file=sys.stderr, flush=True)
        return stop.exit_status
    except KeyboardInterrupt:
        print("shardwise: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like
        return 0


class _Parser(argparse.ArgumentParser):
    """argparse with every usage error as one line (`shardwise: error: ...`), exit status 2.

    A mistyped flag or value gets a suggestion instead of a usage dump; `--help` is unchanged.
    """

    def error(self, message: str) -> typing.NoReturn:
        print(f"shardwise: error: {message.removeprefix('argument ')}", file=sys.stderr)
        raise SystemExit(_EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: --max-step is a mistake to name, not --max-steps to guess.
    parser = _Parser(
        prog="shardwise",
        description="Train sequence models across devices and processes.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {shardwise.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        allow_abbrev=False,
        help="train a model (defaults: byte-level LSTM on Python's documentation text)",
        description="Train a model. Every flag can also be set in the --config TOML file; "
        "flags override the file.",
    )
    train.add_argument(
        "--config", type=Path, metavar="PATH", help="TOML file with any of the keys below"
    )
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
    if overrides.get("resume") == _LATEST:
        overrides["resume"] = _run_dir_to_resume(args.config, overrides)
    from shardwise.slurm import apply_slurm  # inside an srun step: nodes, rank and rendezvous

    overrides = apply_slurm(os.environ, overrides, args.config)
    config = load_config(args.config, overrides, _record(args.config, overrides))
    if "RANK" in os.environ:  # started by the user's torchrun: this process is one worker
        from shardwise.api import run_as_torchrun_worker

        run_as_torchrun_worker(config)
        return 0
    return _launch(config, dry=args.dry_run)


def _record(config_file: Path | None, overrides: dict[str, typing.Any]) -> Record | None:
    """The settings of the run that --resume continues (from the flag or the file), if any:
    what the flags and the file given now change, and nothing else."""
    resume = overrides.get("resume")
    if resume is None and config_file is not None:
        resume = read_toml(config_file).get("resume")
    if resume is None:
        return None
    from shardwise.train.resume import recorded_settings

    return recorded_settings(Path(resume))


def _launch(config: TrainConfig, dry: bool = False) -> int:
    from shardwise.api import plan, run

    if dry:
        print(plan(config).describe())
    else:
        run(config)
    return 0


def _run_dir_to_resume(config_file: Path | None, overrides: dict[str, typing.Any]) -> Path:
    """The run dir a bare `--resume` continues; choose_checkpoint picks its newest good one."""
    # Only --run-dir is read here: the other flags may be settings of the run's own mode (a
    # --sync-every of a local-sgd run), which only its record, read next, makes valid.
    run_dir = overrides.get("run_dir")
    if run_dir is None and config_file is not None:
        run_dir = read_toml(config_file).get("run_dir")
    if run_dir is None:
        raise ShardwiseError(
            "--resume without a path continues the run in --run-dir, and none was given; "
            "add --run-dir RUN_DIR, or pass --resume CHECKPOINT_OR_RUN_DIR"
        )
    return Path(run_dir)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for section, names in SECTIONS.items():
        group = parser.add_argument_group(section)
        for name in names:
            _add_config_flag(group, name, TrainConfig.model_fields[name])


def _add_config_flag(group: typing.Any, name: str, field: typing.Any) -> None:
    kind = _base_type(field.annotation)
    # A field may say how its help shows it (json_schema_extra): a default that depends on other
    # fields (--lr), or a value that is more than its type (--nnodes N|MIN:MAX).
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    default = extra.get("help_default", field.default)
    shown = f" (default: {default})" if default is not None else ""
    # The parser's own default stays None so that only flags the user gave override the file.
    options: dict[str, typing.Any] = {"help": f"{field.description}{shown}", "default": None}
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is typing.Literal:
        options["choices"] = typing.get_args(kind)
        options["type"] = _choice_of("--" + name.replace("_", "-"))  # a refusal that suggests
    else:
        options["metavar"] = extra.get("metavar", _metavar(kind))
    if name == "resume":
        options.update(nargs="?", const=_LATEST)
        options["help"] += " Bare --resume: the newest verified checkpoint of --run-dir."
    group.add_argument("--" + name.replace("_", "-"), dest=name, **options)


def _choices() -> dict[str, tuple[str, ...]]:
    """Every flag that takes one of a few values, and those values."""
    found = {}
    for name, field in TrainConfig.model_fields.items():
        kind = _base_type(field.annotation)
        if typing.get_origin(kind) is typing.Literal:
            found["--" + name.replace("_", "-")] = typing.get_args(kind)
    return found


def _choice_of(flag: str) -> typing.Callable[[str], str]:
    """The type of a flag with choices: the value itself, or a refusal naming the flag it
    belongs to (`--sync powersgd`: a value of --grad-compression) or the value meant."""

    def check(value: str) -> str:
        choices = _choices()
        if value in choices[flag]:
            return value
        listed = ", ".join(choices[flag])
        owners = [other for other, values in choices.items() if value in values]
        if owners:
            uses = " or ".join(f"{other} {value}" for other in owners)
            hint = f"; {value} is a value of {' and '.join(owners)}: {uses}"
        else:
            close = difflib.get_close_matches(value, choices[flag], n=1)
            hint = f" (did you mean {flag} {close[0]}?)" if close else ""
        raise argparse.ArgumentTypeError(f"'{value}' is not one of {listed}{hint}")

    check.__name__ = "choice"  # what argparse would call it in a message
    return check


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag of the parser and its commands."""
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers.extend(action.choices.values())
    return [flag for each in parsers for action in each._actions for flag in action.option_strings]


def _unknown_argument(argument: str, flags: list[str]) -> str:
    """One line for the first argument nothing took, with the flag (or flag and value) it is
    closest to among every flag and every value of a flag with choices."""
    name = argument.split("=", 1)[0]
    owners = {}  # value -> the flags taking it
    for flag, values in _choices().items():
        for value in values:
            owners.setdefault(value, []).append(flag)
    if not name.startswith("-"):
        hint = f" ({name} is a value of {' and '.join(owners[name])})" if name in owners else ""
        return f"unexpected argument '{argument}'{hint}"
    meant = {flag.lstrip("-"): [flag] for flag in flags}
    for value, its_flags in owners.items():
        meant.setdefault(value, [f"{flag} {value}" for flag in its_flags])
    close = difflib.get_close_matches(name.lstrip("-"), meant, n=1)
    hint = f" (did you mean {' or '.join(meant[close[0]])}?)" if close else "; see --help"
    return f"unknown flag {name}{hint}"


def _metavar(kind: object) -> str:
    """INT, FLOAT, PATH, TEXT, or NAME[,NAME...] for a list (given comma-separated)."""
    if typing.get_origin(kind) is list:
        return "NAME[,NAME...]"
    return _METAVARS.get(kind, "VALUE")


def _base_type(annotation: object) -> object:
    """`int` for `int | None`, the Literal itself for a Literal."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return rest[0]
    return annotation


if __name__ == "__main__":
    raise SystemExit(main())
