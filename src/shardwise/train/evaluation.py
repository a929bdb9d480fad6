"""The held-out loss at the end of a run, each data rank taking its share of the sequences.

    eval_loss = held_out_loss(engine, corpus.eval, batch_size=8, env=env)   # None: no tokens

Every rank must call it: the per-rank sums meet in one all-reduce.
"""

from __future__ import annotations

import numpy as np
import torch

from shardwise.data.batch import collate
from shardwise.distributed import DistEnv, all_reduce_sum
from shardwise.train.engines import Engine


@torch.no_grad()
def held_out_loss(
    engine: Engine, sequences: list[np.ndarray], batch_size: int, env: DistEnv
) -> float | None:
    """Token-mean loss of `engine`'s model on `sequences`; None when they hold no tokens."""
    mine = sequences[engine.data_rank :: engine.data_world_size]
    engine.module.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for begin in range(0, len(mine), batch_size):
        batch = collate(mine[begin : begin + batch_size], step_tokens=1)
        loss_sum = engine.eval_loss_sum(batch.to(env.device))
        tokens = batch.n_tokens if engine.owns_counts else 0
        totals += torch.tensor([loss_sum, tokens], dtype=torch.float64)
    engine.module.train()
    loss_sum, tokens = all_reduce_sum(totals, env).tolist()
    return loss_sum / tokens if tokens else None
