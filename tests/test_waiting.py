"""A node waiting at the rendezvous says who has joined, and says when the run is complete."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from shardwise.waiting import waiting_for_nodes

pytestmark = pytest.mark.timeout(30)


def test_a_waiting_node_counts_the_nodes_in(capsys: pytest.CaptureFixture[str]) -> None:
    store = dist.HashStore()
    with waiting_for_nodes(store, "host:29500", nnodes=3, every_s=0.2):
        time.sleep(0.5)
        store.add("shardwise/joined", 1)  # a second node arrives
        time.sleep(0.5)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("shardwise: waiting for nodes at host:29500: 1/3 joined (0s)")
    assert any("2/3 joined" in line for line in lines[1:-1])
    assert lines[-1] == "shardwise: all 3 nodes joined at host:29500 (arrived 1 of 3); training"


def test_a_node_that_never_waited_prints_only_that_it_is_in(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with waiting_for_nodes(dist.HashStore(), "host:29500", nnodes=2, every_s=60):
        pass
    assert capsys.readouterr().err == (
        "shardwise: all 2 nodes joined at host:29500 (arrived 1 of 2); training\n"
    )


def test_one_node_is_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    with waiting_for_nodes(dist.HashStore(), "localhost:1", nnodes=1, every_s=0.01):
        time.sleep(0.1)
    assert capsys.readouterr().err == ""


def test_without_a_store_the_expected_count_is_said(capsys: pytest.CaptureFixture[str]) -> None:
    with waiting_for_nodes(None, "h:1", nnodes=2, every_s=0.1):
        time.sleep(0.25)
    assert "waiting for nodes at h:1: 2 expected" in capsys.readouterr().err
