"""The slow-link testing aids: a 2-node run across network namespaces, and the fallback delay."""

from __future__ import annotations

import runpy
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from shardwise.train.faults import COLLECTIVE_DELAY_ENV

REPO = Path(__file__).parents[2]

# Run by path into a namespace: benchmarks/ is not a package, and its `support` name should not
# shadow anything on the tests' import path.
netem = SimpleNamespace(**runpy.run_path(str(REPO / "benchmarks" / "support" / "netem.py")))
WHY_NOT = netem.unavailable()
TINY_RUN = ["--model", "gru", "--max-len", "64", "--batch-size", "4", "--batching", "fixed"]
TINY_RUN += ["--max-steps", "3", "--log-every", "1", "--sample-bytes", "0", "--no-tensorboard"]
TINY_RUN += ["--timeout-s", "60", "--device", "cpu"]


@pytest.mark.timeout(240)
@pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces here: {WHY_NOT}")
def test_two_nodes_train_through_a_shaped_veth_and_leave_no_namespace(
    corpus: Path, tmp_path: Path
) -> None:
    args = [*TINY_RUN, "--data", str(corpus)]
    with netem.linked_namespaces(2, netem.Link(delay_ms=2, rate_mbit=200)) as net:
        names = list(net.names)
        assert net.shaping != "none"
        before = [net.sent_bytes(node) for node in range(2)]
        run = netem.train_on_nodes(net, args, tmp_path / "run", timeout_s=180)
        sent = [net.sent_bytes(node) - before[node] for node in range(2)]
    assert run.ok, run.outputs
    assert run.summary["world_size"] == 2
    assert len(run.summary["peak_rss_bytes"]) == 2  # a figure from each rank
    # Every step's fp32 gradients crossed the link: a 2-rank ring all-reduce sends each rank's
    # whole gradient once (half reduce-scatter, half all-gather), headers on top.
    assert min(sent) >= 3 * 4 * run.summary["parameters"], sent
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed.split() for name in names)


@pytest.mark.timeout(240)
def test_without_namespaces_two_loopback_nodes_train_with_the_injected_delay(
    corpus: Path, tmp_path: Path
) -> None:
    delay = netem.fallback_environment(netem.Link(delay_ms=500))  # 1 s an exchange
    run = netem.train_on_nodes(None, [*TINY_RUN, "--data", str(corpus)], tmp_path, 180, delay)
    assert run.ok, run.outputs
    assert run.summary["world_size"] == 2
    # Each of the 3 steps all-reduces DDP's gradient bucket once: 3 s of sleeps at least, where
    # the whole run takes a few seconds without them, counted as time blocked in exchanges.
    assert run.summary["wall_time_s"] > 3, run.summary["wall_time_s"]


def test_the_fallback_asks_each_exchange_for_a_round_trip_and_its_bytes() -> None:
    assert netem.fallback_environment(netem.Link(delay_ms=5, rate_mbit=8)) == {
        COLLECTIVE_DELAY_ENV: "0.01:8"
    }
