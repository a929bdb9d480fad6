"""The held-out loss at the end of a run, each data rank taking its share of the sequences.

    eval_loss = held_out_loss(model, corpus.eval, batch_size=8, env=env)   # None: no tokens

Every rank must call it: the per-rank sums meet in one all-reduce. In an asynchronous run the
first worker takes every sequence: the others may have died, and each would leave a gap.
"""

from __future__ import annotations

import numpy as np
import torch

from shardwise.data.batch import collate
from shardwise.distributed import DistEnv, all_reduce_sum
from shardwise.parallel.model import ParallelModel


@torch.no_grad()
def held_out_loss(
    model: ParallelModel, sequences: list[np.ndarray], batch_size: int, env: DistEnv
) -> float | None:
    """Token-mean loss of `model` on `sequences`; None when they hold no tokens."""
    layout = model.layout
    mine = sequences[layout.dp_rank :: layout.dp]
    if model.strategy.updates_remotely:
        mine = sequences if env.is_main else []
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for begin in range(0, len(mine), batch_size):
        batch = collate(mine[begin : begin + batch_size], step_tokens=1).to(env.device)
        loss_sum = model.evaluate(batch.tokens, batch.targets, **batch.model_kwargs(env.device))
        tokens = batch.n_tokens if model.owns_loss else 0
        totals += torch.tensor([float(loss_sum), tokens], dtype=torch.float64)
    model.train()
    loss_sum, tokens = all_reduce_sum(totals, env).tolist()
    return loss_sum / tokens if tokens else None
