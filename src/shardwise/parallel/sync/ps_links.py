"""How an asynchronous run's ranks join: workers and parameter servers, linked pair by pair.

    env, run = join_async_run(device="cpu", timeout_s=300, servers=1)   # instead of
    if run.is_server: serve(run.links)                 # init_distributed(), at the worker entry
    all_reduce_sum(counts, env)                        # workers: through `run`, their meeting

The world's last `servers` ranks are parameter servers. Each (worker, server) pair gets a
two-rank gloo group of its own (`AsyncRun.links`), so a worker that dies breaks only its own
links: the servers and the other workers go on. The servers' default group holds only the
servers. Workers have no process group among themselves: they meet in the job's store
(meeting.py), which a lost worker cannot hold up, and `AsyncRun` is their `DistEnv.collectives`,
so the foundation's collectives reach that meeting without knowing of servers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shardwise.distributed import DistEnv, attempt_store, job_store, join_process_group, place
from shardwise.parallel.sync.meeting import Meeting

# The job store's namespace the workers meet in; a dead worker's supervisor marks it there.
MEETING_NAMESPACE = "workers"


@dataclass(frozen=True)
class AsyncRun:
    """Who is a worker and who a parameter server, the links between them and (workers) their
    meeting: among workers, the `Collectives` of their `DistEnv`."""

    links: dict[int, tuple[dist.ProcessGroup, int]]  # peer: (the pair's group, its rank there)
    rank: int  # workers first, then servers
    workers: list[int]
    servers: list[int]
    timeout_s: float
    meeting: Meeting | None = None  # workers only

    @property
    def is_server(self) -> bool:
        return self.rank in self.servers

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the workers still in the run, in place."""
        parts = self._gather(tensor.detach().cpu().contiguous().numpy().tobytes())
        summed = sum(
            torch.frombuffer(bytearray(parts[r]), dtype=tensor.dtype) for r in sorted(parts)
        )
        return tensor.copy_(summed.view_as(tensor))

    def all_gather(self, value: object) -> list:
        """Every live worker's JSON `value`, in rank order."""
        parts = self._gather(json.dumps(value).encode())
        return [json.loads(parts[rank]) for rank in sorted(parts)]

    def barrier(self) -> None:
        self._gather(b"")

    def broadcast(self, value: object) -> object:
        """The first worker's JSON `value`."""
        first = self.workers[0]
        part = json.dumps(value if self.rank == first else None).encode()
        return json.loads(self._gather(part)[first])

    def _gather(self, part: bytes) -> dict[int, bytes]:
        assert self.meeting is not None, "workers meet; servers do not"
        return self.meeting.gather(part)


def join_async_run(device: str, timeout_s: float, servers: int) -> tuple[DistEnv, AsyncRun | None]:
    """This rank's place in an asynchronous run with `servers` parameter servers, links made.

    A worker's DistEnv counts the workers alone and meets through its `AsyncRun`; a server's
    counts the servers, on the CPU. Unlaunched (no RANK): one process, no run (None).
    """
    here = place(device, aside=servers)
    if "RANK" not in os.environ:
        return here, None
    rank, world = here.rank, here.world_size
    # Keys of this attempt only: the agent keeps its store across elastic restarts.
    store = attempt_store(timeout_s)
    workers, server_ranks = list(range(world - servers)), list(range(world - servers, world))
    links = _pair_links(store, rank, workers, server_ranks, timedelta(seconds=timeout_s))
    if rank in server_ranks:
        cpu = torch.device("cpu")
        own = dist.PrefixStore("servers", store)
        join_process_group(cpu, rank - len(workers), servers, timeout_s, own)
        run = AsyncRun(links, rank, workers, server_ranks, timeout_s)
        env = DistEnv(rank - len(workers), servers, here.local_rank, here.local_world_size, cpu)
        return env, run
    meeting = Meeting(meeting_store(timeout_s), rank, workers, timeout_s)
    run = AsyncRun(links, rank, workers, server_ranks, timeout_s, meeting)
    env = DistEnv(rank, len(workers), here.local_rank, here.local_world_size, here.device, run)
    return env, run


def meeting_store(timeout_s: float = 30.0) -> dist.Store:
    """This attempt's keys in the job's store where the workers meet."""
    return job_store(MEETING_NAMESPACE, timeout_s)


def _pair_links(
    store: dist.Store, rank: int, workers: list[int], servers: list[int], timeout: timedelta
) -> dict[int, tuple[dist.ProcessGroup, int]]:
    """This rank's two-rank group with each peer of the other kind (worker first in each)."""
    links = {}
    # Every rank creates its pairs in the same global (worker, server) order: none waits in a
    # cycle for a peer that is itself waiting.
    for worker in workers:
        for server in servers:
            if rank in (worker, server):
                pair = dist.PrefixStore(f"pair/{worker}/{server}", store)
                group = dist.ProcessGroupGloo(pair, int(rank == server), 2, timeout)
                peer = server if rank == worker else worker
                links[peer] = (group, int(peer == server))
    return links
