"""What a finished run reports: the fields of summary.json gathered from a trainer.

summary = run_summary(trainer, started)   # after the last step; every rank calls it
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from shardwise.distributed import all_gather_floats, peak_memory_bytes
from shardwise.train.evaluation import held_out_loss

if TYPE_CHECKING:
    from shardwise.train.trainer import Trainer


def run_summary(trainer: Trainer, started: float) -> dict:
    """The run's summary.json fields, once training is over (held-out loss measured here)."""
    eval_loss = held_out_loss(
        trainer.model, trainer.corpus.eval, trainer.config.batch_size, trainer.env
    )
    memory = all_gather_floats([peak_memory_bytes(trainer.env.device)], trainer.env)
    return {
        "world_size": trainer.env.world_size,
        "layout": trainer.model.layout.to_dict(),
        "stages": trainer.stages and [list(stage.layer_names) for stage in trainer.stages.stages],
        "device": trainer.env.device.type,
        "precision": trainer.config.precision,
        "sync": trainer.config.sync,
        "model": trainer.config.model,
        "vocab_size": trainer.corpus.vocab_size,
        "steps": trainer.state.step,
        **trainer.totals.summary_fields(
            wall_time_s=time.perf_counter() - started,
            final_train_loss=trainer.last_loss,
            eval_loss=eval_loss,
            peak_rss_bytes=[int(row[0]) for row in memory],
        ),
        "batching": trainer.config.batching,
        "data_notes": trainer.corpus.notes,
        "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
        "resume_notes": trainer.resume_notes,
        "run_dir": str(trainer.run_dir),
    }
