"""The wire between asynchronous workers and parameter servers: messages over point-to-point.

    channel = Channel(run.links, timeout_s=300)      # run: this rank's AsyncRun (ps_links.py)
    channel.send(server, Header(PUSH, version=12), gradient_shard)
    inbox = Inbox(channel, workers=[0, 1], payload_numel=n)   # a server hears every worker
    message = inbox.get()            # Message(worker, header, payload); LOST when it died

Each (worker, server) pair talks over a two-rank gloo group of its own (`AsyncRun.links`),
so a dead worker breaks only its own links. Every message is a fixed-size int64 header, then,
for messages that carry one, a flat float32 payload on the same pair: gloo keeps a pair's
messages in order. A server receives from each worker on a thread of its own (`Inbox`), so it
answers whoever speaks first, and learns of a worker's death from its link failing at once
(its socket closes) rather than from a timeout. Parameters are split over servers by whole
tensors, balanced by size (`assign_shards`).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shardwise.errors import first_line

HELLO, PUSH, BYE = 0, 1, 2  # worker -> server
LOST = -1  # never sent: what a server's inbox says when a worker's link broke
_HEADER_TAG, _PAYLOAD_TAG = 1, 2
_HEADER_FIELDS = 3


@dataclass(frozen=True)
class Header:
    """One message's fixed part.

    Worker to server: `kind` (HELLO, PUSH, BYE), `version` (the server version the pushed
    gradient was computed on). Server to worker: `version` (after this update), `kind` 1 when
    the run's budget is spent (stop), `staleness` of the update it answers (updates applied
    between the worker's pull and its push).
    """

    kind: int
    version: int = 0
    staleness: int = 0

    def tensor(self) -> torch.Tensor:
        return torch.tensor([self.kind, self.version, self.staleness], dtype=torch.int64)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Header:
        return cls(*(int(value) for value in tensor.tolist()))


class Channel:
    """Headers and flat payloads over this rank's links (blocking, with timeout)."""

    def __init__(self, links: dict[int, tuple[dist.ProcessGroup, int]], timeout_s: float) -> None:
        self.links = links
        self.timeout = timedelta(seconds=timeout_s)

    def send(self, peer: int, header: Header, payload: torch.Tensor | None = None) -> None:
        group, rank = self.links[peer]
        group.send([header.tensor()], rank, _HEADER_TAG).wait(self.timeout)
        if payload is not None:
            group.send([payload.contiguous()], rank, _PAYLOAD_TAG).wait(self.timeout)

    def receive_header(self, peer: int, wait: bool = True) -> Header:
        """The next header from `peer`; with `wait`, however long it takes (a server idles until
        its worker speaks), else within the timeout."""
        group, rank = self.links[peer]
        box = torch.empty(_HEADER_FIELDS, dtype=torch.int64)
        work = group.recv([box], rank, _HEADER_TAG)
        work.wait() if wait else work.wait(self.timeout)
        return Header.of(box)

    def receive_payload(self, peer: int, into: torch.Tensor) -> torch.Tensor:
        group, rank = self.links[peer]
        group.recv([into], rank, _PAYLOAD_TAG).wait(self.timeout)
        return into


@dataclass(frozen=True)
class Message:
    """What a server heard from one worker: a header and, for a push, its gradient."""

    worker: int
    header: Header
    payload: torch.Tensor | None = None
    why: str = ""  # for LOST: how the link broke


class Inbox:
    """A server's messages from every worker, in the order they arrive; one thread per worker.

    A worker's thread ends after its BYE, or with a LOST message when its link breaks (the
    worker died: gloo fails the pending receive as soon as the peer's socket closes).
    """

    def __init__(self, channel: Channel, workers: list[int], payload_numel: int) -> None:
        self.channel, self.payload_numel = channel, payload_numel
        self.queue: queue.Queue[Message] = queue.Queue()
        self.threads = [
            threading.Thread(target=self._listen, args=(w,), name=f"inbox-{w}", daemon=True)
            for w in workers
        ]
        for thread in self.threads:
            thread.start()

    def get(self) -> Message:
        return self.queue.get()

    def _listen(self, worker: int) -> None:
        try:
            while True:
                header = self.channel.receive_header(worker)
                payload = None
                if header.kind == PUSH:
                    payload = torch.empty(self.payload_numel)
                    self.channel.receive_payload(worker, payload)
                self.queue.put(Message(worker, header, payload))
                if header.kind == BYE:
                    return
        except (RuntimeError, dist.DistError) as exc:
            self.queue.put(Message(worker, Header(LOST), why=link_failure(exc)))


def link_failure(exc: BaseException) -> str:
    """What broke a link, in a few words: gloo's first sentence, without its source location.

    >>> link_failure(RuntimeError("[pair.cc:553] Connection closed by peer [::1]:80. Check..."))
    'Connection closed by peer [::1]:80'
    """
    line = first_line(exc)
    if line.startswith("["):
        line = line.partition("] ")[2] or line
    return line.split(". ")[0]


def assign_shards(numels: list[int], servers: int) -> list[list[int]]:
    """Parameter indices per server: whole tensors, largest first to the lightest server.

    >>> assign_shards([100, 10, 60, 50], 2)
    [[0, 1], [2, 3]]
    """
    load = [0] * servers
    shards: list[list[int]] = [[] for _ in range(servers)]
    for index in sorted(range(len(numels)), key=lambda i: -numels[i]):
        lightest = min(range(servers), key=load.__getitem__)
        shards[lightest].append(index)
        load[lightest] += numels[index]
    return shards


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One float32 CPU vector of `tensors` (what travels)."""
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy `flat` back into `tensors`, in order (casting to their dtype and device)."""
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset : offset + count].view_as(tensor))
        offset += count
