"""The rules between a config's fields, checked as the config is built (pydantic's after-validator).

    check_sync_rules(config)   # ValueError: --sync local-sgd does not average tensor-parallel ...

They raise ValueError, which pydantic reports as a validation error naming the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shardwise.errors import ShardwiseError
from shardwise.parallel.schedules import pipeline_schedule

if TYPE_CHECKING:
    from shardwise.config.train_config import TrainConfig


def check_sync_rules(config: TrainConfig) -> None:
    """Refuse synchronisation settings that cannot work together (ValueError for pydantic)."""
    if config.grad_compression != "none" and config.sync != "allreduce":
        raise ValueError(
            f"--grad-compression {config.grad_compression} compresses --sync allreduce's "
            f"gradients; --sync {config.sync} sends parameters: drop --grad-compression"
        )
    if config.grad_compression != "none" and config.model_parallel > 1:
        raise ValueError(
            "--grad-compression works through DDP, which only whole-model replicas use; "
            "drop it, or use --pp 1 --tp 1"
        )
    if config.sync != "allreduce" and config.tp > 1:
        raise ValueError(
            f"--sync {config.sync} does not average tensor-parallel shards yet; use --tp 1 "
            "or --sync allreduce"
        )
    check_async_rules(config)
    if config.sync_groups == "node" and config.sync not in ("local-sgd", "diloco"):
        raise ValueError(
            f"--sync-groups node splits local-sgd's and diloco's meetings by machine; --sync "
            f"{config.sync} has none: drop --sync-groups or use --sync local-sgd or diloco"
        )
    if config.sync != "allreduce" and config.precision == "fp16":
        raise ValueError(
            f"--sync {config.sync} lets replicas step apart, so their fp16 loss scales would "
            "drift apart; use --precision bf16 or --sync allreduce"
        )


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
        "--sync": (config.sync != "allreduce", "only allreduce's state reshards onto fewer"),
        "--grad-compression": (
            config.grad_compression == "powersgd",
            "PowerSGD keeps one error feedback per replica",
        ),
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


def check_model_parallel_rules(config: TrainConfig) -> None:
    """Refuse pipeline and tensor-parallel settings that cannot work together."""
    # Checked here rather than in the workers, so a bad combination fails in the launcher
    # within a second instead of after every worker has started and profiled the model.
    if config.precision == "fp16" and config.model_parallel > 1:
        raise ValueError(
            "--precision fp16 is not supported with --pp or --tp above 1 yet (the stages "
            "would have to agree on loss-scale overflows); use --precision bf16"
        )
    try:
        pipeline_schedule(config.schedule).check(config.microbatches, config.pp)
    except ShardwiseError as exc:  # pydantic reports only ValueError as a validation error
        raise ValueError(str(exc)) from None


def check_async_rules(config: TrainConfig) -> None:
    """Parameter servers serve --sync async, on one machine, whole models, without resume."""
    if config.sync != "async":
        if config.ps:
            raise ValueError(f"--ps {config.ps} serves --sync async: drop --ps, or add it")
        return
    if config.ps < 1:
        raise ValueError("--sync async needs parameter servers: add --ps 1 (or more)")
    refusals = {
        "--pp": (config.pp > 1, "workers hold whole models"),
        "--nnodes": (config.nnodes > 1, "servers and workers run on one machine for now"),
        "--checkpoint-every": (config.checkpoint_every > 0, _SERVER_STATE),
        "--resume": (config.resume is not None, _SERVER_STATE),
    }
    for flag, (refused, reason) in refusals.items():
        if refused:
            raise ValueError(f"--sync async does not work with {flag} yet ({reason}); drop {flag}")


_SERVER_STATE = "the servers hold the optimizer state, which checkpoints do not keep yet"


@dataclass(frozen=True)
class _OnlyIn:
    """A setting only some runs read: which ones, what it is for there, and the way to use it."""

    reads: Callable[[TrainConfig], bool]
    here: Callable[[TrainConfig], str]  # the mode that ignores it, as the user would write it
    purpose: str  # what it is, where it is read
    fix: str


def _sync(config: TrainConfig) -> str:
    return f"--sync {config.sync}"


def _whole_model_allreduce(config: TrainConfig) -> bool:
    return config.sync == "allreduce" and config.model_parallel == 1


_TOKEN_BATCHING = "drop it, or use --batching tokens"
_PIPELINE = "drop it, or add --pp 2 or more"
_LOCAL_STEPS = "drop it, or use --sync local-sgd or diloco"
_DILOCO = "drop it, or use --sync diloco"
_POWERSGD = "drop it, or add --grad-compression powersgd"


def _token_batching(config: TrainConfig) -> bool:
    return config.batching == "tokens"


def _pipeline(config: TrainConfig) -> bool:
    return config.pp > 1


def _local_steps(config: TrainConfig) -> bool:
    return config.sync in ("local-sgd", "diloco")


def _diloco(config: TrainConfig) -> bool:
    return config.sync == "diloco"


def _powersgd(config: TrainConfig) -> bool:
    return config.grad_compression == "powersgd"


def _own_model(config: TrainConfig) -> bool:
    return ":" in config.model  # package.module:factory; the built-ins have plain names


def _fixed(config: TrainConfig) -> str:
    return "--batching fixed"


def _one_stage(config: TrainConfig) -> str:
    return "--pp 1"


def _compression(config: TrainConfig) -> str:
    return f"--grad-compression {config.grad_compression}"


def _builtin(config: TrainConfig) -> str:
    return f"the built-in --model {config.model}"


# Every setting that one mode alone reads. Given another value than its default where nothing
# reads it, it is refused: the user asked for something the run would not do (as --batch-size
# under token batching once was, silently). Its default passes: it changes nothing, and a run's
# recorded settings (the checkpoint's, an older config.toml) list every field.
ONLY_IN: dict[str, _OnlyIn] = {
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
    "microbatches": _OnlyIn(_pipeline, _one_stage, "a pipeline's micro-batches", _PIPELINE),
    "schedule": _OnlyIn(_pipeline, _one_stage, "a pipeline's schedule", _PIPELINE),
    "sync_every": _OnlyIn(
        _local_steps, _sync, "local-sgd's and diloco's steps between exchanges", _LOCAL_STEPS
    ),
    "sync_warmup_steps": _OnlyIn(
        _local_steps, _sync, "local-sgd's and diloco's steps of all-reduce first", _LOCAL_STEPS
    ),
    "outer_lr": _OnlyIn(_diloco, _sync, "diloco's outer learning rate", _DILOCO),
    "outer_momentum": _OnlyIn(_diloco, _sync, "diloco's outer momentum", _DILOCO),
    "outer_bf16": _OnlyIn(_diloco, _sync, "diloco's outer exchange in bfloat16", _DILOCO),
    "powersgd_rank": _OnlyIn(_powersgd, _compression, "PowerSGD's rank", _POWERSGD),
    "powersgd_warmup_steps": _OnlyIn(
        _powersgd, _compression, "PowerSGD's uncompressed steps", _POWERSGD
    ),
    "max_staleness": _OnlyIn(
        lambda c: c.sync == "async",
        _sync,
        "how far --sync async's workers may run ahead",
        "drop it, or use --sync async --ps 1",
    ),
    "bucket_mb": _OnlyIn(
        _whole_model_allreduce,
        lambda c: _sync(c) if c.sync != "allreduce" else f"--pp {c.pp} --tp {c.tp}",
        "the size of DDP's gradient buckets, which only --sync allreduce over whole-model "
        "replicas uses",
        "drop it",
    ),
    "input_layout": _OnlyIn(
        _own_model, _builtin, "how a model of your own takes its tokens", "drop it"
    ),
    "model_output": _OnlyIn(
        _own_model, _builtin, "where a model of your own returns its logits", "drop it"
    ),
}


def unread_settings(config: TrainConfig) -> set[str]:
    """The settings `config`'s run never reads, whatever their values (left out of config.toml).

    unread_settings(TrainConfig(batching="fixed"))   # {"tokens_per_batch", "sort_window", ...}
    """
    return {name for name, rule in ONLY_IN.items() if not rule.reads(config)}


def check_no_effect_rules(config: TrainConfig) -> None:
    """Refuse a setting given another value than its default where the run never reads it."""
    fields = type(config).model_fields
    for name in sorted(unread_settings(config) & config.model_fields_set):
        value = getattr(config, name)
        if value != fields[name].default:
            rule = ONLY_IN[name]
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
