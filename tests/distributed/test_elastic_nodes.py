"""`--nnodes 1:2`: a lost node leaves the survivor to go on alone, a late one is admitted."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import assert_same_weights, final_weights, metrics, write_corpus
from train_cli import QUICK_FLAGS, run_train, summary

REPO = Path(__file__).parents[2]
netem = SimpleNamespace(**runpy.run_path(str(REPO / "benchmarks" / "support" / "netem.py")))
WHY_NOT = netem.unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")
STEPS = 12
# One worker per node; 2 steps between checkpoints, so a restart loses at most one or two.
FLAGS = [*QUICK_FLAGS[2:], "--max-steps", str(STEPS), "--checkpoint-every", "2"]
FLAGS += ["--max-restarts", "2"]


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference both tests compare with: one rank accumulating 2 micro-steps throughout
    (two ranks x 1 is that, up to float rounding: test_data_parallel.py), on the same corpus
    (write_corpus is seeded), run once for the module."""
    root = tmp_path_factory.mktemp("elastic_reference")
    corpus = write_corpus(root / "corpus.txt")
    reference = run_train(corpus, root / "alone", *FLAGS[:-4], "--nproc", "1", "--grad-accum", "2")
    assert reference.returncode == 0, reference.stderr
    return root / "alone"


@pytest.fixture
def net() -> Iterator[object]:
    """Two "nodes": network namespaces joined by one veth, removed afterwards."""
    with netem.linked_namespaces(2, netem.Link()) as namespaces:
        yield namespaces


@pytest.mark.timeout(400)
def test_a_lost_node_leaves_the_other_to_finish_alone_with_the_same_global_batch(
    net: object, corpus: Path, tmp_path: Path, alone: Path
) -> None:
    run_dir = tmp_path / "elastic"
    nodes = [_start_node(net, node, corpus, run_dir) for node in range(2)]
    try:
        _wait_for_rows(run_dir / "metrics.jsonl", 3, nodes)
        # The step-2 checkpoint is written in the background: kill once it is sealed, or the
        # survivor rightly starts from step 0 (a kill mid-save leaves only a .partial dir).
        sealed = run_dir / "checkpoints" / "step_00000002" / "manifest.json"
        _wait_for_rows(sealed, 0, nodes)
        assert not (run_dir / "summary.json").exists()
        killed_at = time.monotonic()
        _kill_everything_in(net.names[1])
        resumed_s = _wait_for_line(tmp_path / "node0.log", "resuming from", nodes[0])
        resumed_s -= killed_at
        nodes[0].wait(timeout=300)
        finished_s = time.monotonic() - killed_at
    finally:
        _stop(nodes)
    output = (tmp_path / "node0.log").read_text()
    assert nodes[0].returncode == 0, output[-4000:]
    print(f"survivor resumed {resumed_s:.1f}s and finished {finished_s:.1f}s after the kill")
    done = summary(run_dir)
    assert done["world_size"] == 1
    [restart] = done["restarts"]
    assert restart["world_size"] == 1
    assert restart["reason"].endswith(
        "exited without an error record (killed by a signal, the "
        "out-of-memory killer, or os._exit); nodes left: 2 -> 1 ranks"
    )
    assert 2 <= restart["resumed_from_step"] < STEPS
    assert "1 of at most 2 nodes joined" in output
    _assert_same_run_as_one_rank_accumulating_two(run_dir, alone)


@pytest.mark.timeout(400)
def test_a_node_that_arrives_late_is_admitted_with_the_same_global_batch(
    net: object, corpus: Path, tmp_path: Path, alone: Path
) -> None:
    run_dir = tmp_path / "elastic"
    # Node 0 rests after step 3 (its step-2 checkpoint written) so that, however fast it trains,
    # node 1 arrives mid-run; the rest is the first attempt's only, so it is not waited out.
    nodes = [_start_node(net, 0, corpus, run_dir, {"SHARDWISE_TESTING_PAUSE": "0:3:90"})]
    try:
        _wait_for_rows(run_dir / "metrics.jsonl", 3, nodes)
        nodes.append(_start_node(net, 1, corpus, run_dir))
        for process in nodes:
            process.wait(timeout=300)
    finally:
        _stop(nodes)
    outputs = [(tmp_path / f"node{node}.log").read_text()[-4000:] for node in range(2)]
    assert [process.returncode for process in nodes] == [0, 0], outputs
    done = summary(run_dir)
    assert done["world_size"] == 2
    [restart] = done["restarts"]
    assert (restart["world_size"], restart["reason"]) == (2, "nodes joined: 1 -> 2 ranks")
    assert restart["resumed_from_step"] == 2  # the checkpoint before the rest
    _assert_same_run_as_one_rank_accumulating_two(run_dir, alone)


def _assert_same_run_as_one_rank_accumulating_two(run_dir: Path, alone: Path) -> None:
    """Same global batch, same data order: the run equals one rank accumulating 2 micro-steps
    throughout (the module's `alone` run)."""
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert_same_weights(final_weights(run_dir), final_weights(alone), atol=1e-5)
    for ours, theirs in zip(rows, metrics(alone), strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


def _start_node(
    net: object, node: int, corpus: Path, run_dir: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`shardwise train --nnodes 1:2` in node `node`'s namespace; the store on node 0's."""
    argv = [sys.executable, "-m", "shardwise", "train", "--data", str(corpus), *FLAGS]
    argv += ["--nproc", "1", "--nnodes", "1:2", "--run-dir", str(run_dir)]
    argv += ["--rdzv-endpoint", f"{net.addresses[0]}:29533"]
    with (run_dir.parent / f"node{node}.log").open("w") as log:  # the child keeps its copy
        return subprocess.Popen(
            net.command(node, argv),
            env={**os.environ, **net.environment(node), **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_for_rows(path: Path, rows: int, nodes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for process in nodes:
            assert process.poll() is None, f"a node exited early ({process.returncode})"
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {rows} metrics rows within 120 s")


def _wait_for_line(log: Path, text: str, process: subprocess.Popen) -> float:
    """When `text` appeared in `log` (time.monotonic())."""
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        if text in log.read_text():
            return time.monotonic()
        assert process.poll() is None, log.read_text()[-4000:]
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {log} within 200 s")


def _stop(nodes: list[subprocess.Popen]) -> None:
    for process in nodes:
        if process.poll() is None:
            process.kill()
        process.wait()


def _kill_everything_in(namespace: str) -> None:
    """SIGKILL the node: its launcher, agent and workers, as a machine that loses power."""
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    pids = [int(pid) for pid in listed.stdout.split()]
    assert pids, listed.stderr
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
