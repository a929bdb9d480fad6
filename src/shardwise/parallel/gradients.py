"""Gradients across process groups: summed over data-parallel replicas, and one global norm.

    sum_over_group(stage.parameters(), layout.group("dp"))       # after the last backward
    norm = clip_grad_norm(stage.parameters(), 1.0, layout)       # the norm of the whole model

With pipeline and tensor parallelism no rank holds the whole model, so neither the gradient
all-reduce nor the norm can be left to DDP or `torch.nn.utils.clip_grad_norm_`: each stage sums
its own gradients over its replicas, and the norm adds every stage's and every shard's share.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from shardwise.parallel.mesh import MODEL, ParallelMesh

# Big enough that a few all-reduces carry a step's gradients, small enough not to double memory.
_BUCKET_BYTES = 32 * 2**20


def sum_over_group(params: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Replace each gradient by its sum over `group` (a no-op without a group or with one rank).

    sum_over_group(model.parameters(), layout.group("dp"))

    Gradients are flattened into buckets of one dtype so that a step costs a few all-reduces,
    not one per parameter. Loss normalisation makes a *sum* right here: each replica's loss is
    already divided by the token count of the whole step.
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    grads = [_local(p.grad) for p in params if p.grad is not None]
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def grad_norm(params: Iterable[torch.nn.Parameter], layout: ParallelMesh) -> torch.Tensor:
    """The 2-norm of the whole model's gradient, the same on every rank (float32, on CPU).

    norm = grad_norm(stage.parameters(), layout)

    Each rank adds the squares it alone owns: a shard of a tensor-parallel weight on every
    tensor-parallel rank, a replicated tensor only on tensor-parallel rank 0. The sum then runs
    over the replica's stages and shards; data-parallel replicas hold equal gradients already.
    """
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        if _is_sharded(p.grad) or layout.tp_rank == 0:
            total += _local(p.grad).detach().double().square().sum().cpu()
    group = layout.group(MODEL)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return total.sqrt().float()


def clip_grad_norm(
    params: Iterable[torch.nn.Parameter], max_norm: float, layout: ParallelMesh
) -> torch.Tensor:
    """Scale gradients so the global norm is at most `max_norm` (0: never); returns the norm.

    norm = clip_grad_norm(stage.parameters(), 1.0, layout)

    The same rule as `torch.nn.utils.clip_grad_norm_`: multiply by `max_norm / (norm + 1e-6)`
    when that is below 1, so a pipeline clips exactly as one process would.
    """
    params = list(params)
    norm = grad_norm(params, layout)
    if max_norm <= 0:
        return norm
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                _local(p.grad).mul_(coef)
    return norm


def _local(grad: torch.Tensor) -> torch.Tensor:
    # Under no_grad, DTensor.to_local() is the local shard itself, so writes land in the grad.
    with torch.no_grad():
        return grad.to_local() if isinstance(grad, DTensor) else grad


def _is_sharded(grad: torch.Tensor) -> bool:
    return isinstance(grad, DTensor) and any(isinstance(p, Shard) for p in grad.placements)


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = []
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for group in by_dtype.values():
        current: list[torch.Tensor] = []
        size = 0
        for g in group:
            if current and size + g.numel() * g.element_size() > _BUCKET_BYTES:
                buckets.append(current)
                current, size = [], 0
            current.append(g)
            size += g.numel() * g.element_size()
        buckets.append(current)
    return buckets
