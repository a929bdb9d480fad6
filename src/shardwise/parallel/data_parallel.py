"""Data parallelism: replicas average their gradients, by DDP or by a bucketed all-reduce.

    model = wrap_data_parallel(model, env)                        # whole model on every rank
    with gradient_sync(model, enabled=is_last_micro_step): loss.backward()
    average_over_group(stage.parameters(), layout.group("dp"))    # a stage or shard's replicas

There are two paths because there are two kinds of replica. When every rank holds the whole
model, DDP is the best tool: its buckets all-reduce during backward, overlapping communication
with compute, and its comm hooks are where compression plugs in. A pipeline stage or a
tensor-parallel shard is not a model DDP can wrap (its backward runs inside a schedule, its
gradients are DTensor shards), so those replicas average after the schedule's last backward,
in a few flat buckets. Both average over the data-parallel group, so a caller scales each
replica's loss alike: summed token loss times `dp` over the step's token count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardwise.distributed import DistEnv
from shardwise.parallel.gradients import local_grad
from shardwise.parallel.sharding import accumulating, is_sharded

if TYPE_CHECKING:  # sync/ imports this module: at run time the traffic is only duck-typed
    from shardwise.parallel.mesh import Layout
    from shardwise.parallel.sync.traffic import SyncTraffic

# Big enough that a few all-reduces carry a step's gradients, small enough not to double memory.
_BUCKET_BYTES = 32 * 2**20


def wrap_data_parallel(model: nn.Module, env: DistEnv, bucket_mb: float = 25.0) -> nn.Module:
    """Move `model` to this rank's device and wrap it in DDP when there is more than one rank.

    `bucket_mb` is DDP's `bucket_cap_mb`: the gradient megabytes each all-reduce carries.
    """
    model = model.to(env.device)
    if not env.distributed or env.world_size == 1:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    _make_buffers_contiguous(model)
    # gradient_as_bucket_view saves a gradient-sized copy per step; static_graph is not set
    # because user models may take different paths per batch (packed vs plain tensors).
    return DistributedDataParallel(
        model, device_ids=device_ids, gradient_as_bucket_view=True, bucket_cap_mb=bucket_mb
    )


def warm_up_data_parallel(layout: Layout) -> None:
    """One step of DDP around a toy, then dropped. Building DDP the first time loads torch's
    compiler modules (about 30 MiB resident on CPU with torch 2.13, whatever the model); after
    this they are part of the baseline a rank's peak is measured from. A collective over the
    world, DDP's default group, as `wrap_data_parallel`; the RNG is left as it was."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    device = layout.device
    with torch.random.fork_rng(devices=[]):
        toy = nn.Linear(4, 4).to(device)
    device_ids = [device.index] if device.type == "cuda" else None
    wrapped = DistributedDataParallel(toy, device_ids=device_ids, gradient_as_bucket_view=True)
    wrapped(torch.ones(2, 4, device=device)).sum().backward()


def _make_buffers_contiguous(model: nn.Module) -> None:
    # DDP broadcasts buffers in place, which refuses odd strides even where torch calls the
    # tensor contiguous (the `pe.unsqueeze(0).transpose(0, 1)` of pytorch/examples' positional
    # encoding, strides (64, 320000, 1)): the same values in plain row-major memory.
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            plain = buffer.clone(memory_format=torch.contiguous_format)
            if buffer.stride() != plain.stride():
                setattr(module, name, plain)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside any DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's all-reduce, or a sharded model's reduce-scatter, on inner accumulation
    micro-steps (`enabled=False`)."""
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        with accumulating(model):
            yield
    else:
        yield


def average_over_group(
    params: Iterable[torch.nn.Parameter],
    group: dist.ProcessGroup | None,
    traffic: SyncTraffic | None = None,
) -> None:
    """Replace each gradient by its mean over `group` (a no-op without a group or with one rank).

    average_over_group(stage.parameters(), layout.group("dp"), strategy.traffic)

    Gradients are flattened into buckets of one dtype so that a step costs a few all-reduces,
    not one per parameter; each bucket's bytes are added to `traffic` when one is given.
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    size = dist.get_world_size(group)
    grads = [local_grad(p.grad) for p in params if p.grad is not None]
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        if traffic is not None:
            traffic.sent(flat)
        dist.all_reduce(flat, group=group)  # a sum: gloo has no average
        flat.div_(size)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


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
