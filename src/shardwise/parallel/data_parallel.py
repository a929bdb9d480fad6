"""Synchronous data parallelism with DDP: bucketed all-reduce that overlaps backward.

model = wrap_data_parallel(model, env)
with gradient_sync(model, enabled=is_last_micro_step): loss.backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardwise.distributed import DistEnv


def wrap_data_parallel(model: nn.Module, env: DistEnv) -> nn.Module:
    """Move `model` to this rank's device and wrap it in DDP when there is more than one rank."""
    model = model.to(env.device)
    if not env.distributed or env.world_size == 1:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    # gradient_as_bucket_view saves a gradient-sized copy per step; static_graph is not set
    # because user models may take different paths per batch (packed vs plain tensors).
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside any DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's all-reduce on inner accumulation micro-steps (`enabled=False`)."""
    if enabled or not isinstance(model, DistributedDataParallel):
        yield
        return
    with model.no_sync():
        yield
