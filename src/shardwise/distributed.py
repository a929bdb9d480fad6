"""Process groups, devices and rank helpers for one worker.

    env = init_distributed(device="auto", timeout_s=60)   # reads RANK/WORLD_SIZE from torchrun
    total = all_reduce_sum(torch.tensor([tokens]), env)

A worker started by torchrun or our own elastic launch finds RANK, WORLD_SIZE and LOCAL_RANK in
its environment; without them it is a single process and no process group is created, so the same
code runs unchanged on one CPU process, N local processes, N GPUs and several machines.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from shardwise.errors import ShardwiseError, first_line
from shardwise.signed_store import job_secret, signed

_LET_GLOO_FINISH_S = 0.05  # see shutdown_distributed


@dataclass(frozen=True)
class DistEnv:
    """Where this worker sits: its rank, the world, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    # Where ranks that share no process group meet instead (the collectives below use it).
    collectives: Collectives | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


class Collectives(Protocol):
    """Collective calls among ranks that meet elsewhere than in a process group.

        env = DistEnv(rank, world, rank, world, device, collectives=meeting)
        all_reduce_sum(tensor, env)     # then goes through `meeting`, whatever the group

    A technique whose ranks share no process group (see parallel/sync/ps_links.py) gives its
    ranks one; the functions below hand their call to it.
    """

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, value: object) -> list: ...  # JSON values, by rank

    def barrier(self) -> None: ...

    def broadcast(self, value: object) -> object: ...  # the first rank's JSON value


def resolve_device(preference: str, nproc: int | None = None) -> torch.device:
    """The device kind a run uses; raises ShardwiseError when CUDA is asked for but not there.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ShardwiseError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    count = torch.cuda.device_count()
    if nproc is not None and nproc > count:
        raise ShardwiseError(
            f"--nproc {nproc} with --device cuda: only {count} GPU(s) here; "
            f"use --nproc {count} or fewer, or --device cpu"
        )
    return torch.device("cuda")


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> DistEnv:
    """Join the process group torchrun described in the environment, or run alone without one."""
    env = place(device)
    if "RANK" in os.environ and not dist.is_initialized():
        try:
            store = _group_store(timeout_s)
        except (RuntimeError, dist.DistError) as exc:  # MASTER_ADDR unreachable in time
            raise _not_joined(env.rank, env.world_size, timeout_s, exc) from None
        join_process_group(env.device, env.rank, env.world_size, timeout_s, store)
    return env


def place(device: str = "auto", aside: int = 0) -> DistEnv:
    """This process's rank and device as torchrun described them, its threads set; no group.

    >>> place("cpu").device
    device(type='cpu')

    `aside`: the world's last ranks, which compute nothing on a device (parameter servers): the
    GPUs and cores here are shared among the others, and each of them takes one thread.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    launched = "RANK" in os.environ
    kind = resolve_device(device, local_world_size - aside if launched else None)
    target = torch.device("cuda", local_rank) if kind.type == "cuda" else kind
    if target.type == "cuda" and local_rank < local_world_size - aside:
        torch.cuda.set_device(target)
    elif target.type != "cuda":
        # Each local worker gets its share of the cores; oversubscription slows every rank. A
        # rank set aside only adds and steps: one thread.
        helper = launched and rank >= world_size - aside
        workers_here = max(1, local_world_size - aside)
        # The cores this process may run on (taskset, cgroup cpusets), not the machine's.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(1 if helper else max(1, (cores or 1) // workers_here))
    return DistEnv(rank, world_size, local_rank, local_world_size, target)


# Set by our rendezvous handler in the agent (stores.py) for the workers it starts.
ATTEMPT_ENV = "SHARDWISE_ATTEMPT"


def attempt_number() -> int:
    """Which start of the worker group this is (0: the first), the same on every node.

    The rendezvous round, where our c10d handler ran it: it also counts the restarts that
    admit a node arriving late (--nnodes MIN:MAX), which TORCHELASTIC_RESTART_COUNT does not,
    and which the arriving node's own agent would call its first.
    """
    return int(os.environ.get(ATTEMPT_ENV) or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def _group_store(timeout_s: float) -> dist.Store | None:
    """The store this worker's process group meets in: the job's, this attempt's own keys.

    None only for a first attempt without the job's secret (a torchrun of the user's own):
    torch's env:// then does as it always does. The agent keeps one store across restarts, so a
    restarted group would read the dead attempt's addresses there and dial peers that are gone.
    """
    attempt = attempt_number()
    if job_secret() is None and (
        attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    ):
        return None
    return attempt_store(timeout_s)


def attempt_store(timeout_s: float) -> dist.Store:
    """This attempt's keys in the job's store (rank 0 hosts it where no agent does)."""
    client = _job_client(timeout_s, may_host=True)
    return dist.PrefixStore(f"shardwise/attempt{attempt_number()}", client)


def _job_client(timeout_s: float, may_host: bool = False) -> dist.Store:
    """The job's store at MASTER_ADDR:MASTER_PORT, read through the job's secret where it has one.

    With `may_host`, rank 0 hosts it where no agent does (a hand-set environment, no torchrun).
    """
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    host = may_host and not agent and os.environ.get("RANK") == "0"
    # No world size: the host does not wait for clients here; the group's join times out.
    client = dist.TCPStore(address, port, None, host, timedelta(seconds=timeout_s))
    return signed(client, f"{address}:{port}")


def job_store(namespace: str, timeout_s: float = 30.0) -> dist.Store:
    """This attempt's `namespace` in the job's rendezvous store (the agent's, at MASTER_ADDR).

    Apart from the process groups' keys, for what must outlive a lost rank: heartbeats, and
    meetings of ranks that share no process group.
    """
    namespaced = f"shardwise/{namespace}/attempt{attempt_number()}"
    return dist.PrefixStore(namespaced, _job_client(timeout_s))


def join_process_group(
    device: torch.device, rank: int, world: int, timeout_s: float, store: dist.Store | None = None
) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    if store is not None:
        kwargs["store"] = store
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs
        )
    except (RuntimeError, dist.DistError) as exc:
        raise _not_joined(rank, world, timeout_s, exc) from None


def _not_joined(rank: int, world: int, timeout_s: float, exc: BaseException) -> ShardwiseError:
    return ShardwiseError(
        f"rank {rank}: could not join the {world}-process group within {timeout_s:g}s "
        f"({first_line(exc)}); check that every peer started and can reach MASTER_ADDR"
    )


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined, once every rank is done with it."""
    if dist.is_available() and dist.is_initialized():
        # A rank that tears down gloo while a peer still holds its connections can abort the
        # peer ("terminate called without an active exception"): meet first, then leave.
        dist.barrier()
        # gloo's worker thread drops the barrier's work once it completes, which takes the GIL
        # (the work holds tensors Python owns). Let it, before this process can drop a DDP
        # reducer, whose process group's destructor joins that thread with the GIL held: an
        # own-loop script whose model died right after close() hung there at exit.
        time.sleep(_LET_GLOO_FINISH_S)
        dist.destroy_process_group()


def all_reduce_sum(
    tensor: torch.Tensor, env: DistEnv, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Sum `tensor` over `group`'s ranks (None: all) in place (a no-op alone) and return it.

    The sum travels on `comm_device(env)` whatever device `tensor` is on: NCCL takes CUDA
    tensors only, and counters and losses are often kept on the CPU.
    """
    if env.collectives is not None:
        env.collectives.all_reduce_sum(tensor)
    elif env.distributed:
        travelling = tensor.to(comm_device(env))
        dist.all_reduce(travelling, op=dist.ReduceOp.SUM, group=group)
        if travelling is not tensor:
            tensor.copy_(travelling)
    return tensor


def all_gather_floats(values: list[float], env: DistEnv) -> list[list[float]]:
    """Every rank's `values`, indexed by rank; values must have the same length on all ranks."""
    if env.collectives is not None:
        return env.collectives.all_gather(values)
    local = torch.tensor(values, dtype=torch.float64, device=comm_device(env))
    if not env.distributed:
        return [local.tolist()]
    gathered = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(gathered, local)
    return [t.tolist() for t in gathered]


def barrier(env: DistEnv) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if env.collectives is not None:
        env.collectives.barrier()
    elif env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def broadcast_object(value: object, env: DistEnv) -> object:
    """Rank 0's `value` on every rank (through `env.collectives`: a JSON value)."""
    if env.collectives is not None:
        return env.collectives.broadcast(value)
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value: object, env: DistEnv) -> list:
    """Every rank's `value`, indexed by rank (through `env.collectives`: JSON values)."""
    if env.collectives is not None:
        return env.collectives.all_gather(value)
    if not env.distributed:
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: GPU allocator peak on CUDA, else peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def comm_device(env: DistEnv) -> torch.device:
    """Where a tensor for a collective must live: the rank's GPU under NCCL, else the CPU.

        total = torch.tensor([loss], dtype=torch.float64, device=comm_device(env))
        all_reduce_sum(total, env)

    A CUDA job's backend is NCCL, which takes CUDA tensors only; every other job's is gloo.
    """
    return env.device if env.device.type == "cuda" else torch.device("cpu")
