"""The layout of a job: its parallel degrees, the checks on them, and its DeviceMesh.

    layout = Layout.for_world(4, pp=2).build(env, timeout_s=60)   # dp defaults to 4 / 2 = 2
    layout.pp_rank, layout.group("pp")   # this rank's stage, and its pipeline's process group

`Layout` is the one place where degrees are worked out: the launcher's default process count,
the config's rules, the engines and the pipeline all ask it. Built for a job (`build`), it also
holds this rank's coordinates and one process group per mesh dimension; every run gets a mesh,
data-parallel only included, so a sync strategy can rely on it.

Rank r sits at `(pp, dp, tp)` with `r = (pp_rank * dp + dp_rank) * tp + tp_rank`: tensor-parallel
peers are neighbours (on GPUs, one machine), pipeline stages are furthest apart, since a pipeline
sends only one activation per micro-batch while tensor parallelism talks inside every layer.
Every process group is created here with the job's timeout, so no collective can hang forever.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.parallel.schedules import pipeline_schedule

DIMS = ("pp", "dp", "tp")
# The ranks of one model replica (all its stages and shards): where a global gradient norm sums.
MODEL = "model"
# Sharded data parallel's groups: the data ranks that share one copy of the state, and (when
# there are several copies) those that hold the same shard of each.
SHARD, REPLICATE = "shard", "replicate"


@dataclass(frozen=True)
class Layout:
    """Degrees, this rank's coordinates, and one process group per mesh dimension.

    Layout(dp=2, pp=2).world_size          # 4: degrees alone, no processes needed
    Layout.for_world(8, tp=2).dp           # 4: what pp x tp leaves of the world
    """

    dp: int = 1  # data ranks: ranks that read different data (replicas x shards)
    pp: int = 1
    tp: int = 1
    # Of the dp data ranks, how many hold one copy of the model's state between them (sharded
    # data parallel): dp / shard replicas, each sharded over `shard` data ranks. Not a degree
    # of its own: the ranks are the data ranks, only what they hold differs.
    shard: int = 1
    # New degrees (a sync-group degree) go here, before the `_` marker, so that callers'
    # keyword arguments keep working: a field defaulting to 1, listed in `degrees` (which
    # __post_init__ checks and to_dict records), counted in `world_size`, and, when it gets
    # process groups, a name in DIMS with its axis in `build`.
    _: KW_ONLY
    rank: int = 0
    device_mesh: DeviceMesh | None = None
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, size in self.degrees.items():
            if size < 1:
                raise ShardwiseError(f"--{name} {size}: each parallel degree must be at least 1")
        if self.shard < 1 or self.dp % self.shard:
            raise ShardwiseError(
                f"a sharding over {self.shard} ranks must divide the {self.dp} data ranks (--dp)"
            )

    @classmethod
    def for_world(
        cls, world_size: int, *, dp: int | None = None, pp: int = 1, tp: int = 1
    ) -> Layout:
        """The layout of a `world_size`-rank job; dp defaults to what pp x tp leaves.

        Layout.for_world(4, pp=2)          # dp=2
        Layout.for_world(4, dp=2, pp=3)    # ShardwiseError naming 2 x 3 x 1 = 6 and 4
        """
        replica = cls(pp=pp, tp=tp).replica_size
        layout = cls(dp=max(1, world_size // replica) if dp is None else dp, pp=pp, tp=tp)
        layout.check_world(world_size)
        return layout

    @property
    def degrees(self) -> dict[str, int]:
        """Each degree by its flag name, e.g. {"dp": 2, "pp": 2, "tp": 1}."""
        return {"dp": self.dp, "pp": self.pp, "tp": self.tp}

    def to_dict(self) -> dict[str, int]:
        """The degrees and world size as plain numbers, e.g. for summary.json.

        Layout(dp=2, pp=2).to_dict()   # {"dp": 2, "pp": 2, "tp": 1, "world_size": 4}
        """
        return {**self.degrees, "world_size": self.world_size}

    @property
    def replica_size(self) -> int:
        """Ranks that share one model replica: its stages times its shards (pp x tp)."""
        return self.pp * self.tp

    @property
    def data_ranks(self) -> int:
        """Ranks that read different data (the data-parallel degree): what a batch splits over."""
        return self.dp

    @property
    def data_rank(self) -> int:
        """Which share of the data this rank reads, 0 to data_ranks - 1."""
        return self.dp_rank

    @property
    def replicas(self) -> int:
        """Whole copies of the model's state: the data ranks, less those that shard one copy.

        >>> Layout(dp=4, shard=2).replicas
        2
        """
        return self.dp // self.shard

    @property
    def replica_rank(self) -> int:
        """Which replica this rank's state belongs to."""
        return self.dp_rank // self.shard

    @property
    def world_size(self) -> int:
        return self.dp * self.replica_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.dp * self.tp)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp % self.dp

    @property
    def device(self) -> torch.device:
        """The device this rank computes on, as its mesh says (the CPU without one)."""
        if self.device_mesh is not None and self.device_mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def check_world(self, world_size: int) -> None:
        """Raise `ShardwiseError` unless the degrees fill exactly `world_size` ranks."""
        if self.world_size != world_size:
            dp, pp, tp, n = self.dp, self.pp, self.tp, self.world_size
            raise ShardwiseError(
                f"--dp {dp} x --pp {pp} x --tp {tp} = {n} ranks, but the job has "
                f"{world_size}; choose degrees whose product is {world_size}, or launch "
                f"{n} processes (shardwise train --nproc {n}; your own loop: torchrun "
                f"--nproc-per-node {n})"
            )

    def build(self, env: DistEnv, timeout_s: float = 300.0) -> Layout:
        """This rank's copy with its process groups and DeviceMesh; every rank must call it.

            layout = Layout.for_world(env.world_size, pp=2).build(env, timeout_s=60)
            stage = layout.pp_rank

        A single process without a process group gets no groups (every collective on it is
        skipped by its users). Otherwise the groups are created collectively, in the same order
        on every rank, each with `timeout_s`.
        """
        self.check_world(env.world_size)
        if not env.distributed:
            return replace(self, rank=env.rank)
        ranks = torch.arange(env.world_size).view(self.pp, self.dp, self.tp)
        timeout = timedelta(seconds=timeout_s)
        groups = {
            dim: my_group(_ranks_along(ranks, axis), env.rank, timeout)
            for axis, dim in enumerate(DIMS)
        }
        model_ranks = [ranks[:, d, :].flatten().tolist() for d in range(self.dp)]
        groups[MODEL] = my_group(model_ranks, env.rank, timeout)
        groups |= self._sharding_groups(ranks, env.rank, timeout)
        device_mesh = DeviceMesh.from_group(
            [groups[dim] for dim in DIMS], env.device.type, mesh=ranks, mesh_dim_names=DIMS
        )
        return replace(self, rank=env.rank, device_mesh=device_mesh, groups=groups)

    def _sharding_groups(
        self, ranks: torch.Tensor, rank: int, timeout: timedelta
    ) -> dict[str, dist.ProcessGroup]:
        """ "shard": the data ranks that share one copy of the state; "replicate": the ranks
        holding the same shard of every copy (only when there are several copies)."""
        if self.shard in (1, self.dp):  # none, or the "dp" group itself (see `group`)
            return {}
        # Along dp, contiguous blocks of `shard` ranks: one machine's, as the launcher numbers.
        blocks = ranks.movedim(1, -1).reshape(-1, self.replicas, self.shard)
        shards = blocks.reshape(-1, self.shard).tolist()
        copies = blocks.transpose(1, 2).reshape(-1, self.replicas).tolist()
        return {
            SHARD: my_group(shards, rank, timeout),
            REPLICATE: my_group(copies, rank, timeout),
        }

    def shard_mesh(self) -> DeviceMesh:
        """The DeviceMesh sharded data parallel shards over: the data ranks' 1-D mesh, or a 2-D
        (replicate, shard) mesh when several copies of the state are each sharded (hybrid).

            fully_shard(block, mesh=layout.shard_mesh())
        """
        if self.shard == self.dp:
            return self.submesh("dp")
        if self.device_mesh is None:
            raise RuntimeError("a single process without a process group has no DeviceMesh")
        along = self.all_ranks_along("dp")
        mine = next(ranks for ranks in along if self.rank in ranks)
        return DeviceMesh.from_group(
            [self.groups[REPLICATE], self.groups[SHARD]],
            self.device_mesh.device_type,
            mesh=torch.tensor(mine).view(self.replicas, self.shard),
            mesh_dim_names=(REPLICATE, SHARD),
        )

    def all_ranks_along(self, dim: str) -> list[list[int]]:
        """Every group of ranks along `dim` ("pp", "dp" or "tp"), as `build` lays them out.

        Layout(dp=2, pp=2).all_ranks_along("dp")   # [[0, 1], [2, 3]]
        """
        ranks = torch.arange(self.world_size).view(self.pp, self.dp, self.tp)
        return _ranks_along(ranks, DIMS.index(dim))

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """This rank's group along `dim` ("pp", "dp", "tp", "model", and with sharding "shard"
        and, for several sharded copies, "replicate"); None for one process or no such group."""
        if dim == SHARD and self.shard > 1 and self.shard == self.dp:
            return self.groups.get("dp")
        return self.groups.get(dim)

    def submesh(self, dim: str) -> DeviceMesh:
        """The 1-D DeviceMesh along `dim`, e.g. for `parallelize_module` over "tp"."""
        if self.device_mesh is None:
            raise RuntimeError("a single process without a process group has no DeviceMesh")
        return self.device_mesh[dim]


def check_microbatches(schedule: str, microbatches: int, stages: int) -> None:
    """Raise `ShardwiseError` when `schedule` cannot run `microbatches` over `stages`.

    check_microbatches("1f1b", 2, stages=4)   # ShardwiseError: raise --microbatches to 4
    """
    pipeline_schedule(schedule).check(microbatches, stages)


def _ranks_along(ranks: torch.Tensor, axis: int) -> list[list[int]]:
    """Every group of ranks that differ only in their coordinate along `axis`."""
    return ranks.movedim(axis, -1).reshape(-1, ranks.shape[axis]).tolist()


def my_group(all_ranks: list[list[int]], rank: int, timeout: timedelta) -> dist.ProcessGroup:
    """Create every group in `all_ranks` (collective: all ranks, same order); `rank`'s own."""
    # new_group is collective over the whole world: every rank creates every group, in order.
    mine = None
    for ranks in all_ranks:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    assert mine is not None, f"rank {rank} is in none of {all_ranks}"
    return mine
