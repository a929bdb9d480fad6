"""Gradient aggregation every step: the replicas average their gradients before each update.

    strategy = AllReduceEveryStep(SyncOptions(grad_compression="bf16"))
    module = strategy.wrap(model, layout, env)   # DDP when every rank holds the whole model

The right default on one fast machine: after every backward all replicas hold the same
gradient, so they stay bit-identical. Whole-model replicas use DDP (overlap with backward,
buckets of `bucket_mb`, compression through PyTorch's comm hooks: see compression.py);
pipeline stages and tensor-parallel shards average after their schedule (see data_parallel);
a sharded model (parallel/sharding.py) is left as it is: its reduce-scatter averages.
Either way `traffic` counts the bytes each all-reduce carries; the time they block this rank is
the loop's StepClock wait, since they end the backward (see traffic.py). PowerSGD's state
is the strategy's checkpoint state, each replica's own (see powersgd_state.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.parallel.data_parallel import (
    average_over_group,
    gradient_sync,
    warm_up_data_parallel,
    wrap_data_parallel,
)
from shardwise.parallel.mesh import Layout
from shardwise.parallel.sharding import gradient_payload, is_sharded
from shardwise.parallel.sync.base import StrategyDefaults
from shardwise.parallel.sync.compression import register_compression
from shardwise.parallel.sync.options import SyncOptions
from shardwise.parallel.sync.powersgd_state import PowerSGDMemory
from shardwise.parallel.sync.traffic import SyncTraffic


class AllReduceEveryStep(StrategyDefaults):
    """Average gradients over the data-parallel group after every step's last backward."""

    name = "allreduce"
    replicas_differ = False  # every replica applies the same gradient

    def __init__(self, options: SyncOptions | None = None) -> None:
        self.options = options or SyncOptions()
        self.powersgd: PowerSGDMemory | None = None  # PowerSGD's hook state, once registered
        self.traffic = SyncTraffic()

    def wrap(self, module: nn.Module, layout: Layout, env: DistEnv) -> nn.Module:
        if is_sharded(module):  # its own reduce-scatter averages over the data ranks
            if self.options.grad_compression != "none":
                raise ShardwiseError(
                    f"--grad-compression {self.options.grad_compression} works through DDP's "
                    "hooks, which a sharded model does not use: drop --grad-compression"
                )
            return module
        if layout.replica_size == 1:  # the "dp" group is the whole world: DDP's default group
            module = wrap_data_parallel(module, env, self.options.bucket_mb)
            if isinstance(module, DistributedDataParallel):
                self.powersgd = register_compression(module, self.options, self.traffic)
            return module
        return module.to(env.device)

    def warm_up(self, layout: Layout) -> None:
        """DDP's first step on a toy, where `wrap` will use DDP (parallel/data_parallel.py)."""
        if layout.shard == 1 and layout.replica_size == 1:
            warm_up_data_parallel(layout)

    def skipping(self, module: nn.Module) -> AbstractContextManager[None]:
        return gradient_sync(module, enabled=False)

    def after_backward(self, module: nn.Module, layout: Layout) -> None:
        if is_sharded(module):  # its reduce-scatter averaged during backward
            self.traffic.count(*gradient_payload(module, layout))
        elif layout.replica_size > 1:  # DDP averaged during backward otherwise
            average_over_group(module.parameters(), layout.group("dp"), self.traffic)

    def after_step(self, module: nn.Module, layout: Layout) -> None:
        """Nothing: the replicas applied the same gradient, so they agree already."""

    def finish(self, module: nn.Module, layout: Layout) -> None:
        """Nothing: the replicas never differ."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PowerSGD's state, this replica's own (its error feedback); else nothing."""
        return self.powersgd.state_dict() if self.powersgd is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """PowerSGD continues where it was; the plain and fp16 hooks keep no state."""
        if self.powersgd is not None:
            self.powersgd.load_state_dict(state)
