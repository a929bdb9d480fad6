"""A parameter server: holds a shard of the parameters and their optimizer, steps on pushes.

    server = ParameterServer(shard, optimizer, scheduler, workers=[0, 1], max_steps=300, ...)
    server.serve(channel, Inbox(channel, workers=[0, 1], payload_numel=n))
                                 # returns once every worker has said goodbye, or died

Workers push gradients and pull parameters without waiting for each other. The server steps
its optimizer (the loop's AdamW and learning-rate schedule) once it holds as many pushes as
there are workers, from whichever workers sent them, on their mean: K-async SGD with K the
number of workers (Dutta et al., 2018). A step thus sees as many batches as a synchronous one
and the same --lr means the same, while a fast worker contributes more of them than a slow
one. (Measured first: one optimizer step per push, even scaled by staleness, ended 25% above
synchronous training's eval loss on the test corpus at equal tokens.) Each push is weighted
by 1 / (1 + staleness), staleness being the server's steps since the pushing worker pulled:
a gradient computed on old parameters moves them less (delay-scaled, after Zhang et al.,
2016). `max_staleness` S bounds how many pushes a worker may run ahead of the slowest live
one: its reply (the fresh parameters) is held back until the slowest catches up, so with
S = 0 every step averages one push of each worker on the same parameters, which is
synchronous data-parallel training exactly. After `max_steps` steps pushes are no longer
applied, and every worker is answered with the final parameters and the stop flag. A worker
whose link breaks (it died) is dropped: the slowest live worker is then another, and the
others' pushes fill the steps, since a step waits for a number of pushes, not for each worker.
Clipping is the servers' too, of the step's mean gradient by the whole model's norm (the
servers sum their shares in their own group), as a synchronous step clips the averaged
gradient.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from shardwise.parallel.sync.exchange import (
    BYE,
    HELLO,
    LOST,
    PUSH,
    Channel,
    Header,
    Inbox,
    flatten,
    link_failure,
    unflatten_into,
)


@dataclass
class _Pending:
    """A worker waiting for its reply."""

    worker: int
    staleness: int


@dataclass
class ParameterServer:
    """One server's shard of the parameters, its optimizer, and who is where."""

    shard: list[torch.Tensor]
    optimizer: Optimizer
    scheduler: LRScheduler
    workers: list[int]
    max_steps: int
    max_staleness: int
    clip_norm: float = 0.0  # of the step's mean gradient, over every server's shard
    # Where the shard's tensors sit among the model's parameters, and how many there are: the
    # norm adds every tensor's square sum in the model's order, exactly as one process does.
    positions: list[int] = field(default_factory=list)
    parameters: int = 0
    version: int = 0  # optimizer steps taken
    pushes: dict[int, int] = field(default_factory=dict)
    waiting: list[_Pending] = field(default_factory=list)
    done: set[int] = field(default_factory=set)  # told to stop, left, or lost
    gone: set[int] = field(default_factory=set)  # said goodbye, or lost: nothing more to hear
    lost: dict[int, str] = field(default_factory=dict)  # worker: how its link broke
    staleness: Counter[int] = field(default_factory=Counter)
    gathered: int = 0  # pushes summed towards the next step
    summed: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def serve(self, channel: Channel, inbox: Inbox) -> None:
        """Answer workers until each has said goodbye (after its stop) or has died."""
        self.pushes = {worker: 0 for worker in self.workers}
        self.summed = torch.zeros(sum(t.numel() for t in self.shard))
        while len(self.gone) < len(self.workers):
            message = inbox.get()
            worker, header = message.worker, message.header
            if header.kind in (BYE, LOST):
                self.done.add(worker)
                self.gone.add(worker)
                if header.kind == LOST:
                    self.lost.setdefault(worker, message.why)  # the first sign counts
            elif header.kind == HELLO:
                self.waiting.append(_Pending(worker, 0))
            elif header.kind == PUSH and message.payload is not None:
                staleness = self._push(worker, header, message.payload)
                self.waiting.append(_Pending(worker, staleness))
            self._answer_those_allowed(channel)

    def _push(self, worker: int, header: Header, gradient: torch.Tensor) -> int:
        self.pushes[worker] += 1
        if self.version >= self.max_steps:
            return 0  # past the budget: not applied
        staleness = self.version - header.version
        self.staleness[staleness] += 1
        self.summed.add_(gradient, alpha=1.0 / (1 + staleness))
        self.gathered += 1
        if self.gathered == len(self.workers):
            self._step(self.summed / self.gathered)
            self.summed.zero_()
            self.gathered = 0
        return staleness

    def _step(self, gradient: torch.Tensor) -> None:
        for param, grad in zip(self.shard, _split(gradient, self.shard), strict=True):
            param.grad = grad
        if self.clip_norm > 0:
            total = self._total_norm([param.grad for param in self.shard])
            torch.nn.utils.clip_grads_with_norm_(self.shard, self.clip_norm, total, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.version += 1

    def _total_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The whole model's gradient norm as `clip_grad_norm_` takes it: each tensor's norm,
        in the model's order (zeros for the other servers' tensors, summed in), then theirs."""
        norms = torch.zeros(self.parameters or len(grads))
        for position, grad in zip(self.positions or range(len(grads)), grads, strict=True):
            norms[position] = torch.nn.utils.get_total_norm([grad], foreach=True)
        if dist.is_initialized() and dist.get_world_size() > 1:  # the servers' own group
            dist.all_reduce(norms)
        return torch.linalg.vector_norm(norms)

    def _answer_those_allowed(self, channel: Channel) -> None:
        finished = self.version >= self.max_steps
        live = [self.pushes[w] for w in self.workers if w not in self.done]
        slowest = min(live, default=0)
        still: list[_Pending] = []
        for pending in self.waiting:
            ahead = self.pushes[pending.worker] - slowest
            if finished or ahead <= self.max_staleness:
                self._reply(channel, pending, stop=finished)
            else:
                still.append(pending)
        self.waiting = still

    def _reply(self, channel: Channel, pending: _Pending, stop: bool) -> None:
        if pending.worker in self.done:  # it died while waiting: its inbox thread said so
            return
        reply = Header(int(stop), self.version, pending.staleness)
        try:
            channel.send(pending.worker, reply, flatten(self.shard))
        except (RuntimeError, dist.DistError) as exc:  # it died since its last message
            self.lost[pending.worker] = link_failure(exc)
            self.done.add(pending.worker)
            return
        if stop:
            self.done.add(pending.worker)


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for t in like]
    unflatten_into(flat, parts)
    return parts
