"""The slow-link testing aids: a 2-node run across network namespaces, and the fallback delay."""

from __future__ import annotations

import runpy
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import shardwise.distributed

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
    delay = netem.fallback_environment(netem.Link(delay_ms=500))  # 1 s before each collective
    run = netem.train_on_nodes(None, [*TINY_RUN, "--data", str(corpus)], tmp_path, 180, delay)
    assert run.ok, run.outputs
    assert run.summary["world_size"] == 2
    # Each of the 3 metrics windows (--log-every 1) all-reduces and all-gathers once: 6 s of
    # sleeps at least, where the whole run takes a few seconds without them.
    assert run.summary["wall_time_s"] > 6, run.summary["wall_time_s"]


@pytest.mark.timeout(30)
def test_the_fallback_sleeps_before_each_collective_for_its_delay_and_bytes(monkeypatch) -> None:
    calls, sleeps = [], []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, **kw: calls.append(tensor.numel()))
    monkeypatch.setattr(dist, "all_gather", lambda out, tensor, **kw: calls.append(len(out)))
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src, **kw: calls.append(src))
    monkeypatch.setattr(shardwise.distributed.time, "sleep", sleeps.append)
    monkeypatch.setenv(shardwise.distributed.COLLECTIVE_DELAY_ENV, "0.01:8")  # 8 Mbit/s: 1 MB/s
    shardwise.distributed._delay_collectives_for_testing()
    shardwise.distributed._delay_collectives_for_testing()  # a second call wraps nothing again
    dist.all_reduce(torch.ones(1000))  # 4000 bytes
    dist.all_gather([torch.ones(500), torch.ones(500)], torch.ones(500))
    assert calls == [1000, 2]
    assert sleeps == pytest.approx([0.014, 0.014])
    assert netem.fallback_environment(netem.Link(delay_ms=5, rate_mbit=8)) == {
        shardwise.distributed.COLLECTIVE_DELAY_ENV: "0.01:8"
    }
