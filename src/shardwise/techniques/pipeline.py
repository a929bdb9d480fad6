"""Pipeline stages: the model cut into `--pp` parts that pass micro-batches along a schedule.

    >>> [setting.name for setting in PIPELINE.settings]
    ['microbatches', 'schedule', 'split_points']

The degree itself (`--pp`) is the layout's; this declares the settings a pipeline reads, its
checks, its `PipelineStages` entry and what it costs a rank: its share of the model's state and
the micro-batches its schedule holds in flight (parallel/schedules.py).
"""

from __future__ import annotations

from typing import Any, Literal

from shardwise.errors import ShardwiseError
from shardwise.parallel.schedules import pipeline_schedule
from shardwise.techniques.base import Cost, Footprint, Setting, Technique


def _pipeline(config: Any) -> bool:
    return config.pp > 1


def _one_stage(config: Any) -> str:
    return "--pp 1"


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


_PIPELINE = "drop it, or add --pp 2 or more"

SETTINGS = (
    Setting(
        "microbatches",
        int,
        4,
        "Pipeline micro-batches per batch.",
        {"ge": 1},
        _pipeline,
        _one_stage,
        "a pipeline's micro-batches",
        _PIPELINE,
    ),
    Setting(
        "schedule",
        Literal["gpipe", "1f1b"],
        "1f1b",
        "Pipeline schedule.",
        read_when=_pipeline,
        ignored_by=_one_stage,
        purpose="a pipeline's schedule",
        fix=_PIPELINE,
    ),
    Setting(
        "split_points",
        list[str] | None,
        None,
        "Module names where pipeline stages begin, comma-separated "
        "(e.g. blocks.2). Default: balanced automatically by profiling.",
        parse=_comma_list,
    ),
)


def check(config: Any) -> None:
    """The schedule must be able to run the micro-batches; the cuts must make --pp stages."""
    try:
        pipeline_schedule(config.schedule).check(config.microbatches, config.pp)
    except ShardwiseError as exc:  # pydantic reports only ValueError as a validation error
        raise ValueError(str(exc)) from None
    needed = pipeline_schedule(config.schedule).stage_count(config.pp) - 1
    if config.split_points is not None and len(config.split_points) != needed:
        raise ValueError(
            f"split_points names {len(config.split_points)} cut(s); --pp {config.pp} needs {needed}"
        )


def entry(config: Any, layout: Any) -> Any:
    """The pipeline's stages (cuts empty: balanced by profiling later), or None for one stage."""
    if layout.pp == 1:
        return None
    from shardwise.parallel.parallelism import PipelineStages

    return PipelineStages(
        tuple(config.split_points or ()),
        pipeline_schedule(config.schedule),
        config.microbatches,
    )


def cost(stages: Any, footprint: Footprint) -> Cost:
    """A stage holds 1/pp of the state; its activations are those of the micro-batches its
    schedule keeps in flight on this rank's (first) stage, each 1/microbatches of a batch.
    In flight besides (`in_flight`): torch's pipelining receives into a buffer a micro-batch
    made before the step, so a stage that receives activations (all but the first) or
    gradients (all but the last) holds a whole batch of stage boundaries in each, and a stage
    that sends keeps each micro-batch's output until its backward."""
    pp = footprint.layout.pp
    keep = {part: footprint.parts.get(part, 0) for part in ("parameters", "gradients", "optimizer")}
    memory = {part: -(size - size // pp) for part, size in keep.items()}
    stage = stages.schedule.stages_of(footprint.layout.pp_rank, pp)[0]
    held = stages.schedule.in_flight(stages.microbatches, pp, stage=stage)
    activations = footprint.parts.get("activations", 0)
    # Its own layers' activations (1/pp), for `held` of `microbatches` micro-batches at once.
    stage_activations = activations * held // (pp * stages.microbatches)
    memory["activations"] = stage_activations - activations
    # A backward's workspace is one micro-batch's, on this stage (1/pp of the scaled part).
    workspace = footprint.parts.get("workspace", 0)
    memory["workspace"] = workspace // (pp * stages.microbatches) - workspace
    first, last = stage == 0, stage == stages.schedule.stage_count(pp) - 1
    boundary = footprint.boundary_bytes  # a block's input for the whole batch: a stage's too
    outputs = 0 if last else held * boundary // stages.microbatches
    memory["in_flight"] = (int(not first) + int(not last)) * boundary + outputs
    return Cost(memory=memory)


def warm(stages: Any, layout: Any) -> None:
    """torch's pipelining, loaded before the baseline (parallel/pipeline.py)."""
    from shardwise.parallel.pipeline import warm_up

    warm_up()


PIPELINE = Technique(
    name="pipeline",
    title="Pipeline stages (--pp 2 or more)",
    settings=SETTINGS,
    check=check,
    entry=entry,
    cost=cost,
    warm=warm,
)
