"""The rules between a config's fields, checked as the config is built (pydantic's after-validator).

    check_sync_rules(config)   # ValueError: --sync local-sgd does not average tensor-parallel ...

They raise ValueError, which pydantic reports as a validation error naming the input.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import check_microbatches

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
        check_microbatches(config.schedule, config.microbatches, config.pp)
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
