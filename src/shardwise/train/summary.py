"""What a finished run reports: the fields of summary.json gathered from a trainer.

summary = run_summary(trainer, started)   # after the last step; every rank calls it
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

from shardwise.distributed import DistEnv, all_gather_floats
from shardwise.parallel.sync import SyncStrategy

if TYPE_CHECKING:
    from shardwise.train.trainer import Trainer


def run_summary(trainer: Trainer, started: float) -> dict:
    """The run's summary.json fields, once training is over (held-out loss measured here,
    unless the last step's --eval-every evaluation just did)."""
    eval_loss = trainer.evaluations.loss_at(trainer.state.step)
    held_out = trainer.evaluations.held_out
    staleness = trainer.model.strategy.traffic.staleness
    # The highest staleness rides with the memory gather: the histogram costs a collective
    # only in runs that recorded one.
    memory = all_gather_floats(
        [trainer.memory.meter.lifetime_peak_bytes(), max(staleness, default=-1)], trainer.env
    )
    return {
        "world_size": trainer.env.world_size,
        "layout": trainer.model.layout.to_dict(),
        "stages": trainer.stages and [list(stage.layer_names) for stage in trainer.stages.stages],
        "device": trainer.env.device.type,
        "precision": trainer.config.precision,
        "sync": trainer.config.sync,
        "parallelism": trainer.session.parallelism.record(),  # each technique and its settings
        "model": trainer.config.model,
        "vocab_size": trainer.corpus.vocab_size,
        "steps": trainer.state.step,
        "nonfinite_steps_skipped": trainer.health.skipped,
        **trainer.totals.summary_fields(
            wall_time_s=time.perf_counter() - started,
            final_train_loss=trainer.last_loss,
            eval_loss=eval_loss,
            peak_rss_bytes=[int(row[0]) for row in memory],
        ),
        # The held-out targets eval_loss averages over (at most --eval-tokens), of all held out.
        "eval_tokens": held_out.tokens,
        "eval_tokens_available": held_out.available,
        "eval_s": round(trainer.evaluations.seconds, 3),  # every evaluation's, rank 0's clock
        # The whole run's (kept in checkpoints), where the rates above are this start's own.
        "tokens": trainer.state.tokens,
        "sync_staleness_histogram": staleness_histogram(
            staleness, int(max(row[1] for row in memory)), trainer.env
        ),
        "sync_workers_lost": workers_lost(trainer.model.strategy),
        "memory": trainer.memory.summary(),  # per rank: predicted parts, measured peak, error
        "batching": trainer.config.batching,
        "data_notes": trainer.corpus.notes,
        "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
        "resume_notes": trainer.resume_notes,
        "run_dir": str(trainer.run_dir),
    }


def workers_lost(strategy: SyncStrategy) -> dict[str, str] | None:
    """{rank: why} of the workers that left the run on the way, JSON-keyed (None: a strategy
    whose run never goes on without one)."""
    lost = strategy.lost_replicas()
    return {str(rank): why for rank, why in lost.items()} if lost is not None else None


def staleness_histogram(
    staleness: Counter[int], highest: int, env: DistEnv
) -> dict[str, int] | None:
    """{staleness: steps} summed over ranks, JSON-keyed; None when no rank recorded any.

    staleness_histogram(Counter({0: 5, 2: 1}), highest=2, env)   # {"0": 5, "2": 1} alone

    `highest` is the largest staleness any rank recorded (-1: none), so every rank gathers
    vectors of the same length; every rank must call it.
    """
    if highest < 0:
        return None
    gathered = all_gather_floats([staleness[k] for k in range(highest + 1)], env)
    totals = [int(sum(column)) for column in zip(*gathered, strict=True)]
    return {str(k): n for k, n in enumerate(totals) if n}
