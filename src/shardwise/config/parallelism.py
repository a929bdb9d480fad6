"""The one reader of a config's parallel settings: a TrainConfig turned into a `Parallelism`.

    parallelism = parallelism_from(config, layout, precision)
    model = parallelize(MyLM(), parallelism.with_cuts(cuts), env)

`shardwise train` (through the trainer's Session) and the own-loop `shardwise.setup()` both come
here, so the two cannot read the same settings two ways.
"""

from __future__ import annotations

from shardwise.config.train_config import TrainConfig
from shardwise.parallel.mesh import Layout
from shardwise.parallel.parallelism import Parallelism, PipelineStages
from shardwise.parallel.schedules import pipeline_schedule
from shardwise.parallel.sync import sync_strategy
from shardwise.precision import Precision


def parallelism_from(config: TrainConfig, layout: Layout, precision: Precision) -> Parallelism:
    """How `config` parallelises a model over `layout` (cuts: the config's split points)."""
    pipeline = None
    if layout.pp > 1:
        pipeline = PipelineStages(
            tuple(config.split_points or ()),
            pipeline_schedule(config.schedule),
            config.microbatches,
        )
    return Parallelism(
        layout,
        sync_strategy(config.sync, config.sync_options()),
        pipeline,
        None,  # Parallelism fills in the default split when layout.tp > 1
        config.precision,
        precision.autocast,
        precision.backward,
    )
