"""The rules between the config's own fields, checked as the config is built (pydantic's
after-validator); each technique checks its own settings (techniques/).

    check_elastic_rules(config)   # ValueError: --nnodes 1:2 does not work with --dp ...

They raise ValueError, which pydantic reports as a validation error naming the input.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shardwise.techniques import settings as technique_settings

if TYPE_CHECKING:
    from shardwise.config.train_config import TrainConfig


def split_node_range(nnodes: str, min_nodes: object = None) -> dict[str, object]:
    """`--nnodes` as given ("N" or "MIN:MAX") as the fields nnodes (MAX) and min_nodes.

    split_node_range("1:4")   # {"nnodes": "4", "min_nodes": "1"}
    """
    low, sep, high = nnodes.partition(":")
    if not sep:
        return {"nnodes": nnodes}
    if not (low.strip().isdigit() and high.strip().isdigit()):
        raise ValueError(f"nnodes {nnodes!r} is neither N nor MIN:MAX; give e.g. 2 or 1:2")
    if min_nodes is not None and str(min_nodes) != low.strip():
        raise ValueError(f"nnodes {nnodes!r} and min_nodes {min_nodes} disagree; give one")
    return {"nnodes": high.strip(), "min_nodes": low.strip()}


def check_elastic_rules(config: TrainConfig) -> None:
    """An elastic range of nodes: a smaller world must keep the layout and the global batch."""
    low = config.min_nodes
    if low is not None and low > config.nnodes:
        raise ValueError(f"--nnodes {low}:{config.nnodes}: MIN must not exceed MAX")
    if not config.elastic:
        return
    refusals = {
        "--node-rank": (config.node_rank is not None, "the rendezvous must assign node ranks"),
        "--dp": (config.dp is not None, "the replicas follow the number of nodes"),
    }
    for flag, (refused, reason) in refusals.items():
        if refused:
            raise ValueError(f"--nnodes {low}:{config.nnodes} does not work with {flag} ({reason})")
    # On n of MAX nodes each rank accumulates MAX/n times --grad-accum micro-steps.
    needed = math.lcm(*(n // math.gcd(n, config.nnodes) for n in range(low, config.nnodes + 1)))
    if config.grad_accum % needed:
        raise ValueError(
            f"--nnodes {low}:{config.nnodes} --grad-accum {config.grad_accum}: the global batch "
            f"of {config.nnodes} nodes cannot be split evenly on fewer; use a --grad-accum that "
            f"is a multiple of {needed}"
        )


@dataclass(frozen=True)
class _OnlyIn:
    """A setting only some runs read: which ones, what it is for there, and the way to use it."""

    reads: Callable[[TrainConfig], bool]
    here: Callable[[TrainConfig], str]  # the mode that ignores it, as the user would write it
    purpose: str  # what it is, where it is read
    fix: str


_TOKEN_BATCHING = "drop it, or use --batching tokens"


def _token_batching(config: TrainConfig) -> bool:
    return config.batching == "tokens"


def _own_model(config: TrainConfig) -> bool:
    return ":" in config.model  # package.module:factory; the built-ins have plain names


def _fixed(config: TrainConfig) -> str:
    return "--batching fixed"


def _builtin(config: TrainConfig) -> str:
    return f"the built-in --model {config.model}"


# Every setting of the config's own that one mode alone reads (the techniques' settings declare
# theirs: `only_in()` joins both). Given another value than its default where nothing
# reads it, it is refused: the user asked for something the run would not do (as --batch-size
# under token batching once was, silently). Its default passes: it changes nothing, and a run's
# recorded settings (the checkpoint's, an older config.toml) list every field.
_CORE_ONLY_IN: dict[str, _OnlyIn] = {
    "batch_size": _OnlyIn(
        lambda c: c.batching == "fixed",
        lambda c: "--batching tokens (the default)",
        "--batching fixed's sequences per batch; token batches hold --tokens-per-batch tokens",
        "use --tokens-per-batch N instead, or add --batching fixed",
    ),
    "tokens_per_batch": _OnlyIn(
        _token_batching, _fixed, "token batching's budget", _TOKEN_BATCHING
    ),
    "sort_window": _OnlyIn(
        _token_batching,
        _fixed,
        "token batching's window of length-sorted sequences",
        _TOKEN_BATCHING,
    ),
    "input_layout": _OnlyIn(
        _own_model, _builtin, "how a model of your own takes its tokens", "drop it"
    ),
    "model_output": _OnlyIn(
        _own_model, _builtin, "where a model of your own returns its logits", "drop it"
    ),
}


@functools.cache  # the registry is fixed once read (techniques.registered)
def only_in() -> dict[str, _OnlyIn]:
    """Every setting that some runs do not read: the config's own and the techniques'.

    >>> sorted(only_in())[:3]
    ['batch_size', 'bucket_mb', 'input_layout']
    """
    declared = {
        setting.name: _OnlyIn(
            setting.read_when,
            setting.ignored_by or (lambda config: "this run"),
            setting.purpose or setting.help,
            setting.fix,
        )
        for setting in technique_settings().values()
        if setting.only_in_some_runs
    }
    return {**_CORE_ONLY_IN, **declared}


def unread_settings(config: TrainConfig) -> set[str]:
    """The settings `config`'s run never reads, whatever their values (left out of config.toml).

    unread_settings(TrainConfig(batching="fixed"))   # {"tokens_per_batch", "sort_window", ...}
    """
    return {name for name, rule in only_in().items() if not rule.reads(config)}


def check_no_effect_rules(config: TrainConfig) -> None:
    """Refuse a setting given another value than its default where the run never reads it."""
    fields = type(config).model_fields
    for name in sorted(unread_settings(config) & config.model_fields_set):
        value = getattr(config, name)
        if value != fields[name].default:
            rule = only_in()[name]
            raise ValueError(
                f"{_as_flag(name, value)} has no effect with {rule.here(config)} (it is "
                f"{rule.purpose}); {rule.fix}"
            )
    # A --max-steps of the default counts as not given: every recorded config holds one.
    steps = (
        config.max_steps != fields["max_steps"].default and "max_steps" in config.model_fields_set
    )
    budgets = {"max_steps": steps, "max_tokens": config.max_tokens, "epochs": config.epochs}
    if message := two_budgets([name for name, given in budgets.items() if given]):
        raise ValueError(message)


def two_budgets(given: list[str]) -> str | None:
    """The refusal when more than one of max_steps, max_tokens and epochs is `given`."""
    if len(given) < 2:
        return None
    flags = " and ".join("--" + name.replace("_", "-") for name in given)
    return f"{flags} both say when to stop; give one of them"


def forget_old_batch_size(values: Any) -> Any:
    """Raw config values without `batch_size = 16` under token batching (see below).

    forget_old_batch_size({"batch_size": 16})   # {}: the old default, never read
    """
    # Until --batch-size became --batching fixed's alone it defaulted to 16 and every run's
    # config.toml and checkpoint recorded it, also under token batching, which never read it.
    # Those files must still load: that value counts as not given (it is fixed batching's
    # default, so nothing changes). Another value there is refused as having no effect.
    if not isinstance(values, dict) or values.get("batching", "tokens") != "tokens":
        return values
    if str(values.get("batch_size")) != "16":  # flags arrive as text, TOML as numbers
        return values
    return {key: value for key, value in values.items() if key != "batch_size"}


def _as_flag(name: str, value: object) -> str:
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split 'host:port' and check the port.

    >>> parse_endpoint("localhost:29500")
    ('localhost', 29500)
    """
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rdzv_endpoint {endpoint!r} is not HOST:PORT")
    return host, int(port)
