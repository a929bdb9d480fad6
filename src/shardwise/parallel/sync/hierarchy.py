"""Replicas grouped by machine: the groups hierarchical synchronisation talks over.

    inner, across = node_groups(layout, env, timeout_s=300)
    average_over_group(module.parameters(), inner)      # every step, inside this machine
    average_parameters(module.parameters(), across)     # every H steps, between machines

With `--sync-groups node` local SGD and DiLoCo average gradients every step among the replicas
on one machine, over its fast links, and meet across machines (the slow links) only every H
steps. Each data-parallel group is split by machine: `inner` holds this rank's fellow replicas
on its machine, `across` one replica of each machine, the one at this rank's place in its
machine's share. Because the replicas inside a machine stay identical, averaging across with
any one of them averages the machines. The launcher numbers the ranks of a machine
contiguously, so a rank's machine is `rank // local_world_size`.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import Layout, my_group


def split_by_node(groups: list[list[int]], ranks_per_node: int) -> tuple[list, list]:
    """(inner groups, across groups) of every group in `groups`, for machines of that many ranks.

    >>> split_by_node([[0, 1, 2, 3]], ranks_per_node=2)
    ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    """
    inner: list[list[int]] = []
    across: list[list[int]] = []
    for group in groups:
        by_node: dict[int, list[int]] = {}
        for rank in group:
            by_node.setdefault(rank // ranks_per_node, []).append(rank)
        shares = list(by_node.values())
        if len({len(share) for share in shares}) != 1:
            raise ShardwiseError(
                f"--sync-groups node: the replicas {group} are spread unevenly over machines "
                f"of {ranks_per_node} ranks; give every machine the same --nproc"
            )
        inner.extend(shares)
        across.extend([list(column) for column in zip(*shares, strict=True)])
    return inner, across


def node_groups(
    layout: Layout, env: DistEnv, timeout_s: float
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's replica group inside its machine and across machines (collective)."""
    inner, across = split_by_node(layout.all_ranks_along("dp"), env.local_world_size)
    timeout = timedelta(seconds=timeout_s)
    return my_group(inner, env.rank, timeout), my_group(across, env.rank, timeout)
