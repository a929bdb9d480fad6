"""The wire between asynchronous workers and parameter servers: messages over point-to-point.

    channel = Channel(env.exchange.group, timeout_s=300)
    channel.send(server, Header(PUSH, version=12), gradient_shard)
    header, source = channel.receive_header()          # a server waits for any worker

Workers and servers share one gloo process group of their own (`DistEnv.exchange`), apart from
the workers' default group, so the workers' collectives never wait for a server and the
servers never join them. Every message is a fixed-size int64 header, then, for messages that
carry one, a flat float32 payload on the same (source, destination) pair: gloo keeps each
pair's messages in order, so a header received from any source is followed by its own payload.
Parameters are split over servers by whole tensors, balanced by size (`assign_shards`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

HELLO, PUSH, BYE = 0, 1, 2  # worker -> server
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
    """Headers and flat payloads between ranks of the exchange group (blocking, with timeout)."""

    def __init__(self, group: dist.ProcessGroup, timeout_s: float) -> None:
        self.group = group
        self.timeout = timedelta(seconds=timeout_s)

    def send(self, peer: int, header: Header, payload: torch.Tensor | None = None) -> None:
        self.group.send([header.tensor()], peer, _HEADER_TAG).wait(self.timeout)
        if payload is not None:
            self.group.send([payload.contiguous()], peer, _PAYLOAD_TAG).wait(self.timeout)

    def receive_header(self, peer: int | None = None) -> tuple[Header, int]:
        """The next header from `peer` (None: from whichever rank sends first) and its sender."""
        box = torch.empty(_HEADER_FIELDS, dtype=torch.int64)
        if peer is None:
            work = self.group.recv_anysource([box], _HEADER_TAG)
            work.wait()  # a server idles until some worker speaks: no timeout on waiting
            return Header.of(box), work._source_rank()
        self.group.recv([box], peer, _HEADER_TAG).wait(self.timeout)
        return Header.of(box), peer

    def receive_payload(self, peer: int, into: torch.Tensor) -> torch.Tensor:
        self.group.recv([into], peer, _PAYLOAD_TAG).wait(self.timeout)
        return into


def assign_shards(numels: list[int], servers: int) -> list[list[int]]:
    """Parameter indices per server: whole tensors, largest first to the lightest server.

    >>> assign_shards([100, 10, 60, 50], 2)
    [[0], [2, 3, 1]]
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
