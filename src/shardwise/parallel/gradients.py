"""The whole model's gradient norm, and clipping by it, when no rank holds the whole model.

    norm = clip_grad_norm(stage.parameters(), 1.0, layout)       # the norm of the whole model

With pipeline and tensor parallelism `torch.nn.utils.clip_grad_norm_` sees one stage's shard
only: the norm adds every stage's and every shard's share over the replica's ranks, and with
sharded data parallelism over the data ranks that share the state. With data parallelism alone
the groups are empty and this is the local norm, which after the all-reduce is the global one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from shardwise.parallel.mesh import MODEL, REPLICATE, SHARD, Layout


def grad_norm(params: Iterable[torch.nn.Parameter], layout: Layout) -> torch.Tensor:
    """The 2-norm of the whole model's gradient, the same on every rank (float32, on CPU).

    norm = grad_norm(stage.parameters(), layout)

    Each rank adds the squares it alone owns: a shard of a tensor-parallel weight on every
    tensor-parallel rank, a replicated tensor only on tensor-parallel rank 0, and its own shard
    of a sharded data-parallel model's. The sum then runs over the replica's stages and shards,
    and over the data ranks that share one copy of the state; whole copies hold equal
    gradients already.
    """
    owned = [
        local_grad(p.grad).detach().double().square().sum()
        for p in params
        if p.grad is not None and (layout.tp_rank == 0 or _split_over_tp(p.grad))
    ]
    # Summed where the gradients live: one transfer at most, and NCCL reduces CUDA tensors only.
    total = torch.stack(owned).sum() if owned else torch.zeros((), dtype=torch.float64)
    for group in (layout.group(MODEL), layout.group(SHARD)):
        if group is not None and dist.get_world_size(group) > 1:
            if total.device.type != "cuda" and dist.get_backend(group) == "nccl":
                total = total.cuda()  # none owned here, or gradients offloaded to the host
            dist.all_reduce(total, group=group)
    return total.sqrt().float().cpu()


def clip_grad_norm(
    params: Iterable[torch.nn.Parameter], max_norm: float, layout: Layout
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
                local_grad(p.grad).mul_(coef)
    return norm


def local_grad(grad: torch.Tensor) -> torch.Tensor:
    # Under no_grad, DTensor.to_local() is the local shard itself, so writes land in the grad.
    with torch.no_grad():
        return grad.to_local() if isinstance(grad, DTensor) else grad


def _split_over_tp(grad: torch.Tensor) -> bool:
    """Whether tensor-parallel ranks hold different parts of `grad` (else rank 0 counts it)."""
    if not isinstance(grad, DTensor):
        return False
    names = grad.device_mesh.mesh_dim_names or ()
    if "tp" in names:  # sharded data parallel may add a "dp" or "shard" dimension to it
        return isinstance(grad.placements[names.index("tp")], Shard)
    if names and set(names) <= {"dp", SHARD, REPLICATE}:  # sharded over data ranks alone
        return False
    return any(isinstance(p, Shard) for p in grad.placements)  # a mesh of a user's own
