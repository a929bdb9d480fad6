"""A one-node job listens on loopback only: its stores, the workers' store, gloo's sockets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import quick_config, train
from listeners import SNAPSHOT_DIR_ENV, is_loopback, watch_listeners
from shardwise.stores import free_port


@pytest.mark.timeout(120)  # a few seconds on an idle machine; CI machines are shared
@pytest.mark.parametrize("node_rank", [None, 0], ids=["c10d", "static"])
def test_a_one_node_job_listens_on_loopback_only(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, node_rank: int | None
) -> None:
    monkeypatch.setenv(SNAPSHOT_DIR_ENV, str(tmp_path))  # spawned workers inherit it
    port = free_port()
    config = quick_config(
        corpus,
        tmp_path / "run",
        model="listeners:snapshot_then_gru",
        rdzv_endpoint=f"localhost:{port}",
        node_rank=node_rank,
        timeout_s=30,  # every collective's timeout
    )
    with watch_listeners(os.getpid()) as polled:
        train(config, nproc=2)

    # Each worker recorded the whole job's listeners once its process group was up: the
    # launcher's store and both ranks' gloo sockets were open then, so none can be missed.
    snapshots = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert len(snapshots) == 2
    workers = {snapshot["worker"] for snapshot in snapshots}
    for snapshot in snapshots:
        assert snapshot["launcher"] == os.getpid()
        seen = {
            int(pid): {(a, p) for a, p in found} for pid, found in snapshot["listeners"].items()
        }
        assert port in {p for _, p in seen[os.getpid()]}, "the rendezvous store was not seen"
        assert workers <= seen.keys(), "a worker's (gloo) sockets were not seen"
        assert_loopback_only(seen)
    assert port in {p for _, p in polled[os.getpid()]}
    assert_loopback_only(polled)


def assert_loopback_only(listeners: dict[int, set[tuple[str, int]]]) -> None:
    exposed = sorted(
        (pid, address, port)
        for pid, found in listeners.items()
        for address, port in found
        if not is_loopback(address)
    )
    assert not exposed, f"listening beyond loopback, as (pid, address, port): {exposed}"
