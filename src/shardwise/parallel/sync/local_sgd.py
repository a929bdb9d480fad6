"""Model averaging: every replica steps on its own; parameters are averaged every H steps.

    strategy = PeriodicAveraging(SyncOptions(sync_every=8, sync_warmup_steps=100))
    module = strategy.wrap(stage, layout, env)   # no DDP: backward sends nothing after warm-up
    strategy.after_step(module, layout)          # the loop calls it after every optimizer step

Post-local SGD: the first `sync_warmup_steps` steps average gradients every step (as allreduce
does, after the backward), then the replicas train apart and meet every `sync_every` steps, when
`average_parameters` (PyTorch's model_averaging) replaces each parameter by its mean over the
data-parallel group. A pipeline stage averages with the same stage of the other replicas, since
that is what its "dp" group holds. With `sync_groups="node"` the replicas on one machine
average their gradients every step and the meetings run between machines only (hierarchy.py).
Replicas' parameters between meetings and their optimizer states always differ
(`replicas_differ`), so a checkpoint keeps each replica's own copy.
`traffic` counts every all-reduce's bytes and times the meetings, which come after the
optimizer step where the loop's StepClock does not look (see traffic.py).

No DDP wrap: after warm-up there is nothing for DDP to overlap, and its reducer, buffer
broadcasts and hook dispatch would run every step for nothing; the warm-up pays for that with
an all-reduce after the backward instead of one overlapped with it.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from shardwise.distributed import DistEnv
from shardwise.parallel.data_parallel import average_over_group
from shardwise.parallel.mesh import Layout
from shardwise.parallel.sync.base import StrategyDefaults
from shardwise.parallel.sync.hierarchy import node_groups
from shardwise.parallel.sync.options import SyncOptions
from shardwise.parallel.sync.traffic import SyncTraffic, payload_bytes


class PeriodicAveraging(StrategyDefaults):
    """Local SGD: average the replicas' parameters every `options.sync_every` optimizer steps."""

    name = "local-sgd"
    replicas_differ = True

    def __init__(self, options: SyncOptions | None = None) -> None:
        self.options = options or SyncOptions()
        self.steps = 0  # optimizer steps taken, warm-up included
        self.replicas: dist.ProcessGroup | None = None  # every replica: warm-up, start
        self.group: dist.ProcessGroup | None = None  # who meets every H steps
        self.inner: dist.ProcessGroup | None = None  # --sync-groups node: averages every step
        self.traffic = SyncTraffic()

    def wrap(self, module: nn.Module, layout: Layout, env: DistEnv) -> nn.Module:
        module = module.to(env.device)
        self.replicas = self.group = layout.group("dp") if layout.replicas > 1 else None
        if self.replicas is not None and self.options.sync_groups == "node":
            self.inner, self.group = node_groups(layout, env, self.options.timeout_s)
        if self.replicas is not None:  # start alike, as DDP makes sure of at its wrap
            for param in owned_parameters(module):
                dist.broadcast(param.data, group=self.replicas, group_src=0)
        return module

    def skipping(self, module: nn.Module) -> AbstractContextManager[None]:
        return contextlib.nullcontext()  # the backward never communicates

    def after_backward(self, module: nn.Module, layout: Layout) -> None:
        if self.steps < self.options.sync_warmup_steps:
            average_over_group(module.parameters(), self.replicas, self.traffic)
        elif self.inner is not None:
            average_over_group(module.parameters(), self.inner, self.traffic)

    def after_step(self, module: nn.Module, layout: Layout) -> None:
        self.steps += 1
        local_steps = self.steps - self.options.sync_warmup_steps
        if local_steps <= 0:
            self.warming_up(module)
        elif local_steps % self.options.sync_every == 0:
            with torch.no_grad(), self.traffic.blocked():
                self.exchange(module)

    def finish(self, module: nn.Module, layout: Layout) -> None:
        """Exchange once more unless the last step just did: the run ends with one model."""
        local_steps = self.steps - self.options.sync_warmup_steps
        if local_steps > 0 and local_steps % self.options.sync_every != 0:
            with torch.no_grad(), self.traffic.blocked():
                self.exchange(module)

    def warming_up(self, module: nn.Module) -> None:
        """After a warm-up step: nothing, the replicas applied the same gradient."""

    def exchange(self, module: nn.Module) -> None:
        """Every replica's parameters become their mean over the data-parallel group."""
        if self.group is None:
            return  # one replica: nothing to agree with
        params = owned_parameters(module)
        self.traffic.count(payload_bytes(params))  # average_parameters all-reduces them as one
        average_parameters(iter(params), self.group)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"steps": torch.tensor(self.steps, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = int(state["steps"])


def owned_parameters(module: nn.Module) -> list[nn.Parameter]:
    """This rank's parameters (not the other stages' placeholders on the meta device)."""
    return [param for param in module.parameters() if param.device.type != "meta"]
