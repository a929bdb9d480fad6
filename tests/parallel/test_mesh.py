"""The dp x pp x tp layout: size checks and each rank's coordinates."""

from __future__ import annotations

import pytest
import torch

from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import ParallelMesh, build_mesh, check_layout


def test_a_world_the_degrees_do_not_fill_is_a_user_error_naming_the_numbers() -> None:
    with pytest.raises(
        ShardwiseError, match=r"--dp 2 x --pp 3 x --tp 1 = 6 ranks, but the job has 4"
    ):
        check_layout(4, dp=2, pp=3, tp=1)


def test_degrees_below_one_are_user_errors() -> None:
    with pytest.raises(ShardwiseError, match="--tp 0"):
        check_layout(1, dp=1, pp=1, tp=0)


def test_coordinates_put_tensor_parallel_peers_next_to_each_other() -> None:
    coordinates = [
        (mesh.pp_rank, mesh.dp_rank, mesh.tp_rank)
        for mesh in (ParallelMesh(dp=2, pp=2, tp=2, rank=r) for r in range(8))
    ]
    assert coordinates == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)
    ]  # fmt: skip


def test_one_process_gets_a_mesh_without_groups() -> None:
    mesh = build_mesh(DistEnv(0, 1, 0, 1, torch.device("cpu")))
    assert (mesh.dp, mesh.pp, mesh.tp, mesh.pp_rank) == (1, 1, 1, 0)
    assert mesh.group("dp") is None and mesh.device_mesh is None


def test_one_process_cannot_ask_for_two_stages() -> None:
    with pytest.raises(ShardwiseError, match="but the job has 1"):
        build_mesh(DistEnv(0, 1, 0, 1, torch.device("cpu")), pp=2)
