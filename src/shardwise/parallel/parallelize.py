"""Apply a layout to a model as a visible sequence of small steps over the mesh.

    model = parallelize(MyLM(), layout, env, cuts=["blocks.2"], schedule="1f1b", microbatches=4)

1. `apply_stages`: keep this rank's pipeline stage (the rest moves to "meta").
2. `apply_tensor_parallel`: split the stage's large layers over the tensor-parallel ranks.
3. `apply_sync`: let the synchronisation strategy wrap what the replicas run (DDP today).
4. `build_pipeline`: a schedule per input shape, when there are stages.

Every rank must build the same model with the same seed first. Each step is a no-op when its
degree is 1, so data-parallel-only runs go through the same path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from shardwise.distributed import DistEnv
from shardwise.parallel.mesh import Layout
from shardwise.parallel.model import Backward, ParallelModel
from shardwise.parallel.pipeline import StagePipeline, check_schedule
from shardwise.parallel.stages import Autocast, Boundary, keep_stage
from shardwise.parallel.sync import SyncStrategy, sync_strategy
from shardwise.parallel.tensor_parallel import PARTS, parallelize_lm


def parallelize(
    model: nn.Module,
    layout: Layout,
    env: DistEnv,
    *,
    cuts: Sequence[str] = (),
    schedule: str = "1f1b",
    microbatches: int = 1,
    sync: str | SyncStrategy = "allreduce",
    autocast: Autocast = contextlib.nullcontext,
    backward: Backward = torch.Tensor.backward,
    tp_parts: Sequence[str] = PARTS,
    length_bucket: int = 32,
) -> ParallelModel:
    """`model` prepared for `layout` on this rank (see the module docstring for the steps)."""
    if layout.pp > 1:
        check_schedule(schedule, microbatches, layout.pp)
    max_len = getattr(model, "max_len", None)
    part, boundaries = apply_stages(model, layout, cuts, autocast)
    part = part.to(env.device)
    apply_tensor_parallel(part, layout, tp_parts)
    strategy = sync_strategy(sync) if isinstance(sync, str) else sync
    module = apply_sync(part, layout, env, strategy)
    prepared = ParallelModel(
        module,
        layout,
        strategy,
        autocast=autocast,
        backward=backward,
        length_bucket=length_bucket,
        max_len=max_len,
    )
    if layout.pp > 1:
        prepared.pipeline = build_pipeline(
            part, boundaries, layout, schedule, microbatches, prepared, env.device, autocast
        )
    return prepared


def apply_stages(
    model: nn.Module, layout: Layout, cuts: Sequence[str], autocast: Autocast
) -> tuple[nn.Module, list[Boundary]]:
    """This rank's stage and the stage boundaries; the whole model when replicas hold it."""
    if layout.replica_size == 1:
        return model, []
    return keep_stage(model, cuts, layout.pp, layout.pp_rank, autocast)


def apply_tensor_parallel(part: nn.Module, layout: Layout, parts: Sequence[str]) -> None:
    """Split `parts` of this rank's stage over the tensor-parallel ranks (tp > 1)."""
    if layout.tp > 1:
        parallelize_lm(part, layout.submesh("tp"), parts)


def apply_sync(part: nn.Module, layout: Layout, env: DistEnv, strategy: SyncStrategy) -> nn.Module:
    """What the replicas run forward and backward through, as the strategy wraps it."""
    return strategy.wrap(part, layout, env)


def build_pipeline(
    stage: nn.Module,
    boundaries: list[Boundary],
    layout: Layout,
    schedule: str,
    microbatches: int,
    model: ParallelModel,
    device: torch.device,
    autocast: Autocast,
) -> StagePipeline:
    """The stage's schedules, scoring each micro-batch with the prepared model's loss."""
    return StagePipeline(
        stage,
        boundaries,
        layout,
        schedule,
        microbatches,
        model.pipeline_loss,
        device=device,
        autocast=autocast,
    )
