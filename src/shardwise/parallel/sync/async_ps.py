"""Asynchronous updates: workers push gradients to parameter servers and pull fresh parameters.

    strategy = AsyncUpdates()
    module = strategy.wrap(model, layout, env)     # pulls the servers' parameters
    strategy.step(optimizer_step, module, layout)  # not optimizer_step(): push, then pull

No worker waits for another: each sends its (clipped) gradient to the servers holding the
parameters (`param_server.py`), which step on every as-many-pushes-as-workers, and takes back
the parameters as they are then, so a slow rank slows only its own share of the work. The
run's step budget is global (counted by the servers): a fast worker pushes more of it, which
is where the speed over synchronous training under a straggler comes from. `steps_done` is
the run's progress as the servers count it; once the budget is spent every worker gets the same
final parameters and `stopped` is set.

What is deterministic: with one worker and `--max-staleness 0` the run equals single-process
training. With several workers the order in which pushes reach a server depends on timing, so
two runs differ; their convergence is what the tests check.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import Layout
from shardwise.parallel.sync.base import StrategyDefaults
from shardwise.parallel.sync.exchange import (
    BYE,
    HELLO,
    PUSH,
    Channel,
    Header,
    assign_shards,
    flatten,
    unflatten_into,
)
from shardwise.parallel.sync.options import SyncOptions
from shardwise.parallel.sync.ps_links import AsyncRun
from shardwise.parallel.sync.traffic import SyncTraffic

# The loop's own optimizer never steps here (the servers' do), yet its schedule is stepped.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")


class AsyncUpdates(StrategyDefaults):
    """The worker's side of asynchronous training through parameter servers."""

    name = "async"
    replicas_differ = True  # workers hold parameters of different versions between pulls
    meets_between_steps = False  # workers are at different steps: they meet once, at the end

    def __init__(self, options: SyncOptions | None = None) -> None:
        self.options = options or SyncOptions()
        self.channel: Channel | None = None
        self.run: AsyncRun | None = None  # this worker's links and meeting
        self.servers: list[int] = []
        self.shards: list[list[torch.Tensor]] = []
        self.versions: dict[int, int] = {}
        self.steps = 0  # the first server's count of optimizer steps
        self.stopped = False
        self.traffic = SyncTraffic()  # its staleness: how many server steps old each push was

    def wrap(self, module: nn.Module, layout: Layout, env: DistEnv) -> nn.Module:
        if not isinstance(env.collectives, AsyncRun):
            raise ShardwiseError(
                "--sync async needs parameter-server ranks: start it with `shardwise train "
                "--sync async --ps N` (or shardwise.run), which launches them"
            )
        module = module.to(env.device)
        params = [p for p in module.parameters() if p.requires_grad]
        self.run = env.collectives
        self.channel = Channel(self.run.links, self.run.timeout_s)
        self.servers = self.run.servers
        shards = assign_shards([p.numel() for p in params], len(self.servers))
        self.shards = [[params[i] for i in indices] for indices in shards]
        for server in self.servers:
            self.channel.send(server, Header(HELLO))
        self._pull()
        return module

    def update(self, module: nn.Module) -> None:
        """Push this step's gradients to every server, then pull the parameters they hold now."""
        assert self.channel is not None, "wrap() first"
        for server, shard in zip(self.servers, self.shards, strict=True):
            gradient = flatten([_grad_or_zeros(p) for p in shard])
            self.traffic.sent(gradient)
            with self.traffic.blocked():
                self.channel.send(server, Header(PUSH, self.versions[server]), gradient)
        with self.traffic.blocked():  # the wait for the servers, the staleness bound included
            self._pull()

    def _pull(self) -> None:
        assert self.channel is not None
        told_to_stop: set[int] = set()
        for server, shard in zip(self.servers, self.shards, strict=True):
            reply = self.channel.receive_header(server, wait=False)
            flat = torch.empty(sum(p.numel() for p in shard))
            self.channel.receive_payload(server, flat)
            with torch.no_grad():
                unflatten_into(flat, shard)
            self.versions[server] = reply.version
            if reply.kind:
                told_to_stop.add(server)
            elif server == self.servers[0]:
                self.traffic.staleness[reply.staleness] += 1
        self.steps = self.versions[self.servers[0]]
        if told_to_stop:
            self.stopped = True
            for server in self.servers:  # each listens to this worker until it says goodbye
                self.channel.send(server, Header(BYE))

    def clip_norm(self, max_norm: float) -> float:
        """0, measure only: the servers clip the step's mean gradient."""
        return 0.0

    def step(self, optimizer_step: Callable[[], None], module: nn.Module, layout: Layout) -> None:
        """`update`: the servers' optimizer takes the step; `optimizer_step` is left alone."""
        self.update(module)

    def steps_done(self, local_steps: int, max_steps: int) -> int:
        """The run's optimizer steps done, as the servers count them (all workers together)."""
        return max_steps if self.stopped else min(self.steps, max_steps - 1)

    def evaluation_share(self, batches: int, layout: Layout, env: DistEnv) -> tuple[range, int]:
        """Every batch to the first worker: the others may have died, and each would leave a
        gap."""
        return (range(batches) if env.is_main else range(0)), 1

    def saves_here(self, env: DistEnv) -> bool:
        """The first worker alone: all end on the servers' final parameters, and none waits for
        another (a peer may have died)."""
        return env.is_main

    def lost_replicas(self) -> dict[int, str] | None:
        """The workers whose supervisors said they died, as the meetings found them."""
        meeting = self.run.meeting if self.run is not None else None
        return dict(meeting.lost) if meeting is not None else None

    def skipping(self, module: nn.Module) -> AbstractContextManager[None]:
        return contextlib.nullcontext()  # gradients travel once per step, in update()

    def after_backward(self, module: nn.Module, layout: Layout) -> None:
        """Nothing: the gradient is pushed after clipping, by `update`."""

    def after_step(self, module: nn.Module, layout: Layout) -> None:
        """Nothing: `update` pulled the servers' parameters already."""

    def finish(self, module: nn.Module, layout: Layout) -> None:
        """Nothing: the servers answer every worker's last push with the same final parameters."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing: an asynchronous run is not resumed (the servers' state is not saved)."""


def _grad_or_zeros(param: nn.Parameter) -> torch.Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)
