"""The Layout: degrees, the default dp, every refusal, coordinates and the DeviceMesh."""

from __future__ import annotations

import pytest
import torch

from ranks import COLLECTIVE_TIMEOUT_S, run_ranks
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import Layout, check_microbatches

ALONE = DistEnv(0, 1, 0, 1, torch.device("cpu"))


def test_degrees_default_to_one_and_multiply_into_the_world() -> None:
    layout = Layout(dp=2, pp=3)
    assert (layout.degrees, layout.replica_size, layout.world_size) == (
        {"dp": 2, "pp": 3, "tp": 1},
        3,
        6,
    )


def test_the_record_for_summary_json_holds_degrees_and_world_size() -> None:
    assert Layout(dp=2, pp=2).to_dict() == {"dp": 2, "pp": 2, "tp": 1, "world_size": 4}


@pytest.mark.parametrize(
    ("world", "degrees", "dp"),
    [(4, {}, 4), (4, {"pp": 2}, 2), (8, {"pp": 2, "tp": 2}, 2), (4, {"dp": 1, "tp": 4}, 1)],
)
def test_dp_defaults_to_what_pp_and_tp_leave_of_the_world(
    world: int, degrees: dict[str, int], dp: int
) -> None:
    assert Layout.for_world(world, **degrees).dp == dp


def test_a_world_the_degrees_do_not_fill_is_a_user_error_naming_the_numbers() -> None:
    with pytest.raises(
        ShardwiseError, match=r"--dp 2 x --pp 3 x --tp 1 = 6 ranks, but the job has 4"
    ):
        Layout.for_world(4, dp=2, pp=3)


def test_a_replica_larger_than_the_world_is_refused_with_the_nproc_it_needs() -> None:
    with pytest.raises(ShardwiseError, match=r"= 4 ranks, but the job has 2.*--nproc 4"):
        Layout.for_world(2, pp=2, tp=2)


@pytest.mark.parametrize("degree", ["dp", "pp", "tp"])
def test_degrees_below_one_are_user_errors(degree: str) -> None:
    with pytest.raises(ShardwiseError, match=f"--{degree} 0: each parallel degree"):
        Layout(**{degree: 0})


@pytest.mark.parametrize(("schedule", "microbatches"), [("1f1b", 4), ("1f1b", 9), ("gpipe", 1)])
def test_enough_micro_batches_for_the_schedule_pass(schedule: str, microbatches: int) -> None:
    check_microbatches(schedule, microbatches, stages=4)


def test_1f1b_with_fewer_micro_batches_than_stages_names_the_fix() -> None:
    with pytest.raises(ShardwiseError, match="raise --microbatches to 4 or use --schedule gpipe"):
        check_microbatches("1f1b", 2, stages=4)


def test_coordinates_put_tensor_parallel_peers_next_to_each_other() -> None:
    coordinates = [
        (mesh.pp_rank, mesh.dp_rank, mesh.tp_rank)
        for mesh in (Layout(dp=2, pp=2, tp=2, rank=r) for r in range(8))
    ]
    assert coordinates == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)
    ]  # fmt: skip


def test_one_process_gets_a_layout_without_groups_or_mesh() -> None:
    mesh = Layout.for_world(1).build(ALONE)
    assert (mesh.dp, mesh.pp, mesh.tp, mesh.pp_rank) == (1, 1, 1, 0)
    assert mesh.group("dp") is None and mesh.device_mesh is None
    with pytest.raises(RuntimeError, match="no DeviceMesh"):
        mesh.submesh("tp")


def test_one_process_cannot_ask_for_two_stages() -> None:
    with pytest.raises(ShardwiseError, match="but the job has 1"):
        Layout.for_world(1, pp=2).build(ALONE)


def _mesh_shapes(env: DistEnv, degrees: dict[str, int]) -> dict:
    layout = Layout.for_world(env.world_size, **degrees).build(env, COLLECTIVE_TIMEOUT_S)
    mesh = layout.device_mesh
    assert mesh is not None
    return {
        "names": mesh.mesh_dim_names,
        "shape": tuple(mesh.shape),
        "group_sizes": {dim: layout.group(dim).size() for dim in ("pp", "dp", "tp", "model")},
        "tp_submesh": layout.submesh("tp").mesh.tolist(),
    }


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("degrees", "shape", "sizes"),
    [
        ({}, (1, 2, 1), {"pp": 1, "dp": 2, "tp": 1, "model": 1}),  # data-parallel only
        ({"tp": 2}, (1, 1, 2), {"pp": 1, "dp": 1, "tp": 2, "model": 2}),
    ],
    ids=["dp2", "tp2"],
)
@pytest.mark.distributed
def test_every_distributed_run_gets_a_pp_dp_tp_mesh(
    degrees: dict[str, int], shape: tuple[int, ...], sizes: dict[str, int]
) -> None:
    ranks = run_ranks(_mesh_shapes, world=2, args=(degrees,))
    for rank, result in enumerate(ranks):
        assert result["names"] == ("pp", "dp", "tp")
        assert result["shape"] == shape
        assert result["group_sizes"] == sizes
        assert result["tp_submesh"] == ([rank] if sizes["tp"] == 1 else [0, 1])
