"""Apply a layout to a model as a visible sequence of small steps over the mesh.

    parallelism = Parallelism(layout, sync, pipeline=PipelineStages(("blocks.2",), microbatches=4))
    model = parallelize(MyLM(), parallelism, env)

0. `layer_split_for`: which layers tensor parallelism splits, planned on the whole model.
1. `apply_stages`: keep this rank's pipeline stage (the rest moves to "meta").
2. `apply_tensor_parallel`: split the stage's share of the plan over the tensor-parallel ranks,
   and check on a probe batch that the split part computes what it did whole.
3. `apply_techniques`: every other technique in effect changes the part, in registration order
   (techniques/: activation recompute, sharding, ...).
4. `apply_sync`: let the synchronisation strategy wrap what the replicas run (DDP today).
5. `build_pipeline`: a schedule per input shape, when there are stages.

Every rank must build the same model with the same seed first. Each step is a no-op when its
degree is 1, so data-parallel-only runs go through the same path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.loss import token_loss_sum
from shardwise.models.contract import PLAIN, ModelContract
from shardwise.parallel.faithful import check_faithful_chain, probe_tokens, token_bound
from shardwise.parallel.mesh import Layout
from shardwise.parallel.model import ParallelModel
from shardwise.parallel.parallelism import Parallelism, PipelineStages
from shardwise.parallel.pipeline import StagePipeline
from shardwise.parallel.stages import Autocast, Boundary, keep_stage
from shardwise.parallel.sync import SyncStrategy
from shardwise.parallel.tensor_parallel import (
    PARTS,
    LayerSplit,
    checked_split,
    find_layer_split,
    require_split,
)


def parallelize(
    model: nn.Module,
    parallelism: Parallelism,
    env: DistEnv,
    contract: ModelContract = PLAIN,
) -> ParallelModel:
    """`model` prepared for `parallelism` on this rank (see the module docstring for the steps).

    `contract`: how the whole model takes tokens and gives logits (models/contract.py).
    """
    layout, stages = parallelism.layout, parallelism.pipeline
    if stages is not None and layout.pp > 1:
        # Also for a loop of the user's own, which no preflight checked.
        vocab = contract.vocab_size or token_bound(model)
        check_faithful_chain(model, vocab, partial(contract, model))
    max_len = getattr(model, "max_len", None)
    parts = parallelism.tensor.parts if parallelism.tensor is not None else PARTS
    plan = layer_split_for(
        model, layout.tp, parts, contract
    )  # before stages: probes the whole model
    part, boundaries = apply_stages(model, layout, stages, parallelism.autocast)
    part = part.to(env.device)
    if plan is not None:
        probe = split_probe(part, layout, boundaries, plan, contract, env.device)
        apply_tensor_parallel(part, layout, plan, probe)
    part = apply_techniques(part, parallelism)
    module = apply_sync(part, layout, env, parallelism.sync)
    pipeline = None
    if stages is not None and layout.pp > 1:
        pipeline = build_pipeline(part, boundaries, parallelism, env.device)
    return ParallelModel(
        module,
        layout,
        parallelism.sync,
        pipeline,
        autocast=parallelism.autocast,
        backward=parallelism.backward,
        length_bucket=stages.length_bucket if stages is not None else 32,
        max_len=max_len,
        contract=contract,
    )


def apply_stages(
    model: nn.Module, layout: Layout, stages: PipelineStages | None, autocast: Autocast
) -> tuple[nn.Module, list[Boundary]]:
    """This rank's stage and the stage boundaries; the whole model without stages."""
    if layout.pp == 1 or stages is None:  # tensor parallelism alone splits layers in place
        return model, []
    schedule = stages.schedule
    held = schedule.stages_of(layout.pp_rank, layout.pp)
    if len(held) != 1:
        raise ShardwiseError(
            f"--schedule {schedule.name} holds {len(held)} stages a rank; this version runs one"
        )
    count = schedule.stage_count(layout.pp)
    return keep_stage(model, stages.cuts, count, held[0], autocast)


def layer_split_for(
    model: nn.Module, tp: int, parts: Sequence[str], contract: ModelContract
) -> LayerSplit | None:
    """What tensor parallelism over `tp` ranks splits (None for tp 1), planned on the whole
    model through its call; refused when it would split nothing.

        plan = layer_split_for(model, 2, PARTS, contract)   # in the launcher and in every worker
    """
    if tp == 1:
        return None
    forward = partial(contract, model)
    plan = find_layer_split(model, tp, parts, forward, vocab_size=contract.vocab_size)
    require_split(plan, model)
    return plan


def apply_tensor_parallel(
    part: nn.Module, layout: Layout, plan: LayerSplit, probe: Callable[[], torch.Tensor]
) -> None:
    """Split this rank's share of `plan` over the tensor-parallel ranks, its outputs checked."""
    styles = plan.within(part)
    if styles:  # else a stage with nothing to split: its ranks run it whole, alike
        checked_split(part, layout.submesh("tp"), styles, probe)


def split_probe(
    part: nn.Module,
    layout: Layout,
    boundaries: list[Boundary],
    plan: LayerSplit,
    contract: ModelContract,
    device: torch.device,
) -> Callable[[], torch.Tensor]:
    """`part` on a seeded probe input: tokens for the model or the first stage, else an
    activation shaped like the stage boundary before it."""
    tokens = probe_tokens(plan.token_bound, device)
    if layout.pp == 1:
        return lambda: contract(part, tokens)
    if layout.pp_rank == 0:  # the first stage (with one stage a rank, see apply_stages)
        return lambda: part(tokens)
    shape, dtype = boundaries[layout.pp_rank - 1]  # what the stage before it sends
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((*tokens.shape, *shape), generator=generator)
    x = x.to(device, torch.float32 if dtype.is_floating_point else dtype)
    return lambda: part(x)


def apply_techniques(part: nn.Module, parallelism: Parallelism) -> nn.Module:
    """`part` after each technique in effect that changes it (its `apply`), in their order."""
    for technique, entry in parallelism.in_effect():
        if technique.apply is not None:
            part = technique.apply(part, entry, parallelism.layout)
    return part


def warm_techniques(parallelism: Parallelism) -> None:
    """Each technique in effect runs its code once on a toy (its `warm`), so that what the code
    costs once is the process's before a memory baseline is taken. A collective."""
    for technique, entry in parallelism.in_effect():
        if technique.warm is not None:
            technique.warm(entry, parallelism.layout)


def apply_sync(part: nn.Module, layout: Layout, env: DistEnv, strategy: SyncStrategy) -> nn.Module:
    """What the replicas run forward and backward through, as the strategy wraps it."""
    return strategy.wrap(part, layout, env)


def build_pipeline(
    stage: nn.Module, boundaries: list[Boundary], parallelism: Parallelism, device: torch.device
) -> StagePipeline:
    """The stage's schedules, scoring each micro-batch by its summed token loss."""
    stages = parallelism.pipeline
    assert stages is not None
    return StagePipeline(
        stage,
        boundaries,
        parallelism.layout,
        stages.schedule,
        stages.microbatches,
        token_loss_sum,
        device=device,
        autocast=parallelism.autocast,
    )
