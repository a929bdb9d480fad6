"""The rules between a config's fields, checked as the config is built (pydantic's after-validator).

    check_sync_rules(config)   # ValueError: --sync local-sgd does not average tensor-parallel ...

They raise ValueError, which pydantic reports as a validation error naming the input.
"""

from __future__ import annotations

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
    if config.sync != "allreduce" and config.precision == "fp16":
        raise ValueError(
            f"--sync {config.sync} lets replicas step apart, so their fp16 loss scales would "
            "drift apart; use --precision bf16 or --sync allreduce"
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
