"""Run a test's worker function on N gloo ranks, each a fresh process, and collect the results.

    results = run_ranks(train_two_stages, world=2, args=("gpipe",))   # [rank 0's, rank 1's]

The worker is called as `worker(env, *args)` inside an initialised gloo group with a short
timeout, on a free local port; whatever it returns must be `torch.save`-able. The worker is
found again in the child by its file and name, so it may live in any test module. A worker that
raises fails the test with its traceback; a job still running after `timeout_s` is killed.
"""

from __future__ import annotations

import importlib.util
import inspect
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardwise.distributed import DistEnv
from shardwise.stores import free_port

COLLECTIVE_TIMEOUT_S = 20.0


def run_ranks(
    worker: Callable[..., Any],
    world: int,
    args: tuple = (),
    timeout_s: float = 60.0,
    per_node: int | None = None,
) -> list[Any]:
    """`worker(env, *args)` on ranks 0..world-1; returns their results, indexed by rank.

    `per_node` ranks make one pretend machine (`env.local_rank`, `env.local_world_size`), as
    the launcher numbers them: contiguously. Default: all on one.
    """
    source = inspect.getsourcefile(worker)
    assert source is not None, worker
    with tempfile.TemporaryDirectory(prefix="shardwise-ranks-") as out:
        context = mp.start_processes(
            _entry,
            args=(world, per_node or world, free_port(), source, worker.__name__, args, out),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{worker.__name__} on {world} ranks ran past {timeout_s}s")
        # Our own children wrote these files, and results may be any picklable object.
        return [
            torch.load(Path(out) / f"rank{rank}.pt", weights_only=False) for rank in range(world)
        ]


def _entry(
    rank: int, world: int, per_node: int, port: int, source: str, name: str, args: tuple, out: str
) -> None:
    torch.set_num_threads(1)  # N ranks share this machine's few cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        env = DistEnv(rank, world, rank % per_node, per_node, torch.device("cpu"))
        result = _load(source, name)(env, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _load(source: str, name: str) -> Callable[..., Any]:
    spec = importlib.util.spec_from_file_location(f"_ranks_{Path(source).stem}", source)
    assert spec is not None and spec.loader is not None, source
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)
