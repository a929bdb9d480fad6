"""Apply a layout to a model as a visible sequence of small steps over the mesh.

    model = parallelize(MyLM(), layout, env, cuts=["blocks.2"], schedule="1f1b", microbatches=4)

0. `plan_split`: which layers tensor parallelism splits, planned on the whole model.
1. `apply_stages`: keep this rank's pipeline stage (the rest moves to "meta").
2. `apply_tensor_parallel`: split the stage's share of the plan over the tensor-parallel ranks,
   and check on a probe batch that the split part computes what it did whole.
3. `apply_sync`: let the synchronisation strategy wrap what the replicas run (DDP today).
4. `build_pipeline`: a schedule per input shape, when there are stages.

Every rank must build the same model with the same seed first. Each step is a no-op when its
degree is 1, so data-parallel-only runs go through the same path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from shardwise.distributed import DistEnv
from shardwise.models.contract import PLAIN, ModelContract
from shardwise.parallel.faithful import check_faithful_chain, probe_tokens, token_bound
from shardwise.parallel.mesh import Layout
from shardwise.parallel.model import Backward, ParallelModel
from shardwise.parallel.pipeline import StagePipeline, check_schedule
from shardwise.parallel.stages import Autocast, Boundary, keep_stage
from shardwise.parallel.sync import SyncStrategy, sync_strategy
from shardwise.parallel.tensor_parallel import (
    PARTS,
    SplitPlan,
    checked_split,
    require_split,
    split_plan,
)


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
    contract: ModelContract = PLAIN,
) -> ParallelModel:
    """`model` prepared for `layout` on this rank (see the module docstring for the steps)."""
    if layout.pp > 1:
        check_schedule(schedule, microbatches, layout.pp)
        # Also for a loop of the user's own, which no preflight checked.
        vocab = contract.vocab_size or token_bound(model)
        check_faithful_chain(model, vocab, partial(contract, model))
    max_len = getattr(model, "max_len", None)
    plan = plan_split(model, layout.tp, tp_parts, contract)  # before stages: probes the whole model
    part, boundaries = apply_stages(model, layout, cuts, autocast)
    part = part.to(env.device)
    if plan is not None:
        probe = split_probe(part, layout, boundaries, plan, contract, env.device)
        apply_tensor_parallel(part, layout, plan, probe)
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
        contract=contract,
    )
    if layout.pp > 1:
        prepared.pipeline = build_pipeline(
            part, boundaries, layout, schedule, microbatches, prepared, env.device, autocast
        )
    return prepared


def apply_stages(
    model: nn.Module, layout: Layout, cuts: Sequence[str], autocast: Autocast
) -> tuple[nn.Module, list[Boundary]]:
    """This rank's stage and the stage boundaries; the whole model without stages."""
    if layout.pp == 1:  # tensor parallelism alone splits layers in place: no pieces needed
        return model, []
    return keep_stage(model, cuts, layout.pp, layout.pp_rank, autocast)


def plan_split(
    model: nn.Module, tp: int, parts: Sequence[str], contract: ModelContract
) -> SplitPlan | None:
    """What tensor parallelism over `tp` ranks splits (None for tp 1), planned on the whole
    model through its call; refused when it would split nothing.

        plan = plan_split(model, 2, PARTS, contract)   # in the launcher and in every worker
    """
    if tp == 1:
        return None
    forward = partial(contract, model)
    plan = split_plan(model, tp, parts, forward, vocab_size=contract.vocab_size)
    require_split(plan, model)
    return plan


def apply_tensor_parallel(
    part: nn.Module, layout: Layout, plan: SplitPlan, probe: Callable[[], torch.Tensor]
) -> None:
    """Split this rank's share of `plan` over the tensor-parallel ranks, its outputs checked."""
    styles = plan.within(part)
    if styles:  # else a stage with nothing to split: its ranks run it whole, alike
        checked_split(part, layout.submesh("tp"), styles, probe)


def split_probe(
    part: nn.Module,
    layout: Layout,
    boundaries: list[Boundary],
    plan: SplitPlan,
    contract: ModelContract,
    device: torch.device,
) -> Callable[[], torch.Tensor]:
    """`part` on a seeded probe input: tokens for the model or the first stage, else an
    activation shaped like the stage boundary before it."""
    tokens = probe_tokens(plan.token_bound, device)
    if layout.pp == 1:
        return lambda: contract(part, tokens)
    if layout.pp_rank == 0:
        return lambda: part(tokens)
    shape, dtype = boundaries[layout.pp_rank - 1]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((*tokens.shape, *shape), generator=generator)
    x = x.to(device, torch.float32 if dtype.is_floating_point else dtype)
    return lambda: part(x)


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
