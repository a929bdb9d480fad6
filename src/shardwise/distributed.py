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
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shardwise.errors import ShardwiseError, first_line


@dataclass(frozen=True)
class DistEnv:
    """Where this worker sits: its rank, the world, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


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
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    kind = resolve_device(device, local_world_size if "RANK" in os.environ else None)
    target = torch.device("cuda", local_rank) if kind.type == "cuda" else kind
    if target.type == "cuda":
        torch.cuda.set_device(target)
    else:
        # Each local process gets its share of the cores; oversubscription slows every rank.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    if "RANK" in os.environ and not dist.is_initialized():
        _init_process_group(target, rank, world_size, timeout_s)
    return DistEnv(rank, world_size, local_rank, local_world_size, target)


def _init_process_group(device: torch.device, rank: int, world: int, timeout_s: float) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs
        )
    except (RuntimeError, dist.DistError) as exc:
        raise ShardwiseError(
            f"rank {rank}: could not join the {world}-process group within {timeout_s:g}s "
            f"({first_line(exc)}); check that every peer started and can reach MASTER_ADDR"
        ) from None


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined, once every rank is done with it."""
    if dist.is_available() and dist.is_initialized():
        # A rank that tears down gloo while a peer still holds its connections can abort the
        # peer ("terminate called without an active exception"): meet first, then leave.
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(
    tensor: torch.Tensor, env: DistEnv, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Sum `tensor` over `group`'s ranks (None: all) in place (a no-op alone) and return it.

    The sum travels on `comm_device(env)` whatever device `tensor` is on: NCCL takes CUDA
    tensors only, and counters and losses are often kept on the CPU.
    """
    if env.distributed:
        travelling = tensor.to(comm_device(env))
        dist.all_reduce(travelling, op=dist.ReduceOp.SUM, group=group)
        if travelling is not tensor:
            tensor.copy_(travelling)
    return tensor


def all_gather_floats(values: list[float], env: DistEnv) -> list[list[float]]:
    """Every rank's `values`, indexed by rank; values must have the same length on all ranks."""
    local = torch.tensor(values, dtype=torch.float64, device=comm_device(env))
    if not env.distributed:
        return [local.tolist()]
    gathered = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(gathered, local)
    return [t.tolist() for t in gathered]


def barrier(env: DistEnv) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def broadcast_object(value: object, env: DistEnv) -> object:
    """Rank 0's `value` on every rank."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
