"""DiLoCo: local SGD whose every-H exchange feeds an outer optimizer.

    strategy = DiLoCo(SyncOptions(sync_every=50, outer_lr=0.7, outer_momentum=0.9))
    module = strategy.wrap(model, layout, env)

Each replica runs `sync_every` inner steps (the loop's own optimizer, AdamW), then the replicas
average their pseudo-gradient, anchor − local parameters, and an outer SGD with Nesterov
momentum steps the anchor by it; every replica restarts from the new anchor. With outer lr 1
and no momentum this is exactly local SGD. The anchor and the outer momentum are the
strategy's state, saved in checkpoints; `outer_bf16` sends the pseudo-gradient in bfloat16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from shardwise.distributed import DistEnv
from shardwise.parallel.mesh import Layout
from shardwise.parallel.sync.local_sgd import PeriodicAveraging


class DiLoCo(PeriodicAveraging):
    """Local SGD with an outer Nesterov-momentum SGD over the averaged pseudo-gradient."""

    name = "diloco"

    def wrap(self, module: nn.Module, layout: Layout, env: DistEnv) -> nn.Module:
        module = super().wrap(module, layout, env)
        self.named = [(n, p) for n, p in module.named_parameters() if p.device.type != "meta"]
        self.anchors = {name: param.detach().clone() for name, param in self.named}
        momentum = self.options.outer_momentum
        self.outer = torch.optim.SGD(
            list(self.anchors.values()),
            lr=self.options.outer_lr,
            momentum=momentum,
            nesterov=momentum > 0,  # torch refuses Nesterov without momentum
        )
        if momentum > 0:  # zeros from the start: the first step is the same, and saveable
            for anchor in self.anchors.values():
                self.outer.state[anchor]["momentum_buffer"] = torch.zeros_like(anchor)
        return module

    def warming_up(self, module: nn.Module) -> None:
        """The anchor follows the replicas (all alike) until the local steps begin."""
        with torch.no_grad():
            for name, param in self.named:
                self.anchors[name].copy_(param)

    def exchange(self, module: nn.Module) -> None:
        """Outer step on the mean of anchor − local parameters; every replica takes the anchor."""
        anchors = [self.anchors[name] for name, _ in self.named]
        params = [param for _, param in self.named]
        flat = torch.cat([(a - p).reshape(-1) for a, p in zip(anchors, params, strict=True)])
        if self.options.outer_bf16:
            flat = flat.to(torch.bfloat16)
        if self.group is not None:
            self.traffic.sent(flat)
            dist.all_reduce(flat, group=self.group)  # a sum: gloo has no average
        flat = flat.float().div_(dist.get_world_size(self.group) if self.group else 1)
        offset = 0
        for anchor in anchors:
            anchor.grad = flat[offset : offset + anchor.numel()].view_as(anchor).to(anchor.dtype)
            offset += anchor.numel()
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        for anchor, param in zip(anchors, params, strict=True):
            param.copy_(anchor)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        for name, anchor in self.anchors.items():
            state[f"anchor.{name}"] = anchor
            buffer = self.outer.state[anchor].get("momentum_buffer")
            if buffer is not None:
                state[f"momentum.{name}"] = buffer
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for name, anchor in self.anchors.items():
                anchor.copy_(state[f"anchor.{name}"])
                if f"momentum.{name}" in state:
                    self.outer.state[anchor]["momentum_buffer"].copy_(state[f"momentum.{name}"])
