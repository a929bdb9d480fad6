"""The layout of a job: pp x dp x tp ranks on one DeviceMesh, and this rank's place in it.

    layout = build_mesh(env, dp=2, pp=2, tp=1, timeout_s=60)   # on 4 ranks
    layout.pp_rank, layout.group("pp")   # this rank's stage, and its pipeline's process group

Rank r sits at `(pp, dp, tp)` with `r = (pp_rank * dp + dp_rank) * tp + tp_rank`: tensor-parallel
peers are neighbours (on GPUs, one machine), pipeline stages are furthest apart, since a pipeline
sends only one activation per micro-batch while tensor parallelism talks inside every layer.
Every process group is created here with the job's timeout, so no collective can hang forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError

DIMS = ("pp", "dp", "tp")
# The ranks of one model replica (all its stages and shards): where a global gradient norm sums.
MODEL = "model"


def check_layout(world_size: int, dp: int, pp: int, tp: int) -> None:
    """Raise `ShardwiseError` unless `dp * pp * tp` is exactly `world_size` (all at least 1).

    check_layout(4, dp=2, pp=2, tp=1)   # fine
    check_layout(4, dp=2, pp=3, tp=1)   # ShardwiseError naming 2 x 3 x 1 = 6 and 4
    """
    for name, size in (("dp", dp), ("pp", pp), ("tp", tp)):
        if size < 1:
            raise ShardwiseError(f"--{name} {size}: each parallel degree must be at least 1")
    if dp * pp * tp != world_size:
        raise ShardwiseError(
            f"--dp {dp} x --pp {pp} x --tp {tp} = {dp * pp * tp} ranks, but the job has "
            f"{world_size}; choose degrees whose product is {world_size}, or launch "
            f"{dp * pp * tp} processes (--nproc {dp * pp * tp})"
        )


@dataclass(frozen=True)
class ParallelMesh:
    """Degrees, this rank's coordinates, and one process group per mesh dimension."""

    dp: int
    pp: int
    tp: int
    rank: int = 0
    device_mesh: DeviceMesh | None = None
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.dp * self.tp)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp % self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """This rank's group along `dim` ("pp", "dp", "tp" or "model"); None for one process."""
        return self.groups.get(dim)

    def submesh(self, dim: str) -> DeviceMesh:
        """The 1-D DeviceMesh along `dim`, e.g. for `parallelize_module` over "tp"."""
        if self.device_mesh is None:
            raise RuntimeError("a single process without a process group has no DeviceMesh")
        return self.device_mesh[dim]


def build_mesh(
    env: DistEnv, dp: int = 1, pp: int = 1, tp: int = 1, timeout_s: float = 300.0
) -> ParallelMesh:
    """This rank's `ParallelMesh` over the job's `env.world_size` ranks; every rank must call it.

        layout = build_mesh(env, dp=1, pp=2)
        stage = layout.pp_rank

    A single process without a process group gets a mesh with no groups (every collective on it
    is skipped by its users). Otherwise the groups are created collectively, in the same order
    on every rank, each with `timeout_s`.
    """
    check_layout(env.world_size, dp, pp, tp)
    if not env.distributed:
        return ParallelMesh(dp, pp, tp, env.rank)
    layout = torch.arange(env.world_size).view(pp, dp, tp)
    timeout = timedelta(seconds=timeout_s)
    groups = {
        dim: _my_group(_ranks_along(layout, axis), env.rank, timeout)
        for axis, dim in enumerate(DIMS)
    }
    model_ranks = [layout[:, d, :].flatten().tolist() for d in range(dp)]
    groups[MODEL] = _my_group(model_ranks, env.rank, timeout)
    device_mesh = DeviceMesh.from_group(
        [groups[dim] for dim in DIMS], env.device.type, mesh=layout, mesh_dim_names=DIMS
    )
    return ParallelMesh(dp, pp, tp, env.rank, device_mesh, groups)


def _ranks_along(layout: torch.Tensor, axis: int) -> list[list[int]]:
    """Every group of ranks that differ only in their coordinate along `axis`."""
    return layout.movedim(axis, -1).reshape(-1, layout.shape[axis]).tolist()


def _my_group(all_ranks: list[list[int]], rank: int, timeout: timedelta) -> dist.ProcessGroup:
    # new_group is collective over the whole world: every rank creates every group, in order.
    mine = None
    for ranks in all_ranks:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    assert mine is not None, f"rank {rank} is in none of {all_ranks}"
    return mine
