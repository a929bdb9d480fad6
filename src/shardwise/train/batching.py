"""Which batch sampler a run uses: token-budget balanced batches (default) or fixed-size ones.

sampler = build_sampler(config, lengths, world_size=2, rank=0)
next(iter(sampler))   # BatchRequest for this rank's first micro-step
"""

from __future__ import annotations

import numpy as np

from shardwise.config import TrainConfig
from shardwise.data.cost import cost_model_for
from shardwise.data.sampler import FixedBatchSampler, SamplerPosition
from shardwise.data.token_sampler import TokenBudgetSampler


def build_sampler(
    config: TrainConfig,
    lengths: np.ndarray,
    world_size: int,
    rank: int,
    start: SamplerPosition | None = None,
) -> FixedBatchSampler | TokenBudgetSampler:
    """The sampler `config.batching` names, over sequences of `lengths`, for one data rank."""
    if config.batching == "fixed":
        return FixedBatchSampler(
            lengths, config.batch_size, world_size, rank, config.grad_accum, config.seed, start
        )
    return TokenBudgetSampler(
        lengths,
        config.tokens_per_batch,
        world_size,
        rank,
        config.grad_accum,
        config.seed,
        start,
        cost_model=cost_model_for(config.model),
        packing=config.packs_rows,
        sort_window=config.sort_window,
    )


def stream_identity(config: TrainConfig) -> dict[str, object]:
    """What defines the order of the data stream; a resumed run must keep it to stay exact."""
    identity: dict[str, object] = {"batching": config.batching, "seed": config.seed}
    if config.batching == "tokens":
        identity["sort_window"] = config.sort_window
    return identity
