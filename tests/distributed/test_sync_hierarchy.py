"""--sync-groups node: every step inside a machine, meetings between machines (4 gloo ranks
as two pretend machines of two)."""

from __future__ import annotations

import pytest

from parallel_cases import Trained, assert_same_state
from ranks import run_ranks
from sync_loops import sync_loops

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

NODE = {"sync_groups": "node"}
JOBS: dict[str, tuple] = {
    "flat allreduce sgd": ({"sync": "allreduce"}, range(4), "sgd"),
    "by node H=1 sgd": ({"sync": "local-sgd", "sync_every": 1, **NODE}, range(4), "sgd"),
    "by node H=4, 3 steps": ({"sync": "local-sgd", "sync_every": 4, **NODE}, range(3)),
    "by node H=4, 4 steps": ({"sync": "local-sgd", "sync_every": 4, **NODE}, range(4)),
    "diloco lr 1 by node": (
        {"sync": "diloco", "sync_every": 2, "outer_lr": 1.0, "outer_momentum": 0.0, **NODE},
        range(4),
    ),
    "local by node": ({"sync": "local-sgd", "sync_every": 2, **NODE}, range(4)),
}


@pytest.fixture(scope="module")
def runs() -> dict[str, list[Trained]]:
    ranks = run_ranks(sync_loops, world=4, args=(tuple(JOBS.values()),), timeout_s=280, per_node=2)
    return dict(zip(JOBS, [list(results) for results in zip(*ranks, strict=True)], strict=True))


def test_meeting_every_step_with_plain_sgd_equals_allreduce(runs: dict) -> None:
    for mine, theirs in zip(runs["by node H=1 sgd"], runs["flat allreduce sgd"], strict=True):
        assert_same_state(mine.state, theirs.state, 1e-6)


def test_a_machine_keeps_its_replicas_equal_and_machines_meet_every_h(runs: dict) -> None:
    apart = [trained.state for trained in runs["by node H=4, 3 steps"]]
    assert_same_state(apart[0], apart[1], 0.0)  # machine 0: averaged every step
    assert_same_state(apart[2], apart[3], 0.0)  # machine 1
    with pytest.raises(AssertionError):
        assert_same_state(apart[0], apart[2], 1e-6)  # the machines went their own ways
    met = [trained.state for trained in runs["by node H=4, 4 steps"]]
    for state in met[1:]:
        assert_same_state(state, met[0], 1e-6)


def test_diloco_with_outer_lr_1_and_no_momentum_equals_local_sgd_by_node(runs: dict) -> None:
    for mine, theirs in zip(runs["diloco lr 1 by node"], runs["local by node"], strict=True):
        assert_same_state(mine.state, theirs.state, 1e-6)
