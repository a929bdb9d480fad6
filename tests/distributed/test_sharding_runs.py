"""Sharded checkpoints hold the same logical tensors as any other layout's: a run saved with
--shard full resumes under plain DDP or on one process, a DDP checkpoint resumes sharded, and
each ends where the uninterrupted run ends. A killed sharded worker restarts and ends
bit-identical to the run that was never killed. Through the public entry points (`shardwise.run`
and the `shardwise train` command), on 2 CPU workers."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from helpers import (
    assert_same_weights,
    final_weights,
    metrics,
    quick_config,
    train,
    write_corpus,
)
from shardwise.stores import free_port
from train_cli import assert_identical_weights, run_train, start_train, summary

pytestmark = pytest.mark.timeout(300)

# The sharded run three tests read: `shardwise train --shard full`, 6 steps, a checkpoint every 3.
SHARDED_FLAGS = ("--shard", "full", "--max-steps", "6", "--checkpoint-every", "3")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The sharded run, run once for the module (it is train_cli's quick run, the same run as
    quick_config's on 2 ranks with those settings): its corpus, its run dir and its stderr.
    The tests that compare with it or resume from it use this corpus (seeded: the `corpus`
    fixture's text) and never write into its run dir."""
    root = tmp_path_factory.mktemp("sharded")
    corpus = write_corpus(root / "corpus.txt")
    with pytest.MonkeyPatch.context() as patch:  # as conftest's private_corpus_cache does
        patch.setenv("SHARDWISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        whole = run_train(corpus, root / "whole", *SHARDED_FLAGS)
    assert whole.returncode == 0, whole.stderr
    return corpus, root / "whole", whole.stderr


def resumed_from(source: Path, step: int, target: Path) -> Path:
    """A copy of `source`'s checkpoint of `step` in run dir `target`, to resume from."""
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
    return target / "checkpoints" / name


def test_checkpoints_move_between_sharded_and_replicated_layouts(
    sharded: tuple[Path, Path, str], tmp_path: Path
) -> None:
    corpus, sharded_run, _ = sharded
    steps = {"max_steps": 6}
    plain = quick_config(corpus, tmp_path / "plain", checkpoint_every=3, **steps)
    train(plain, nproc=2)
    # The sharded run: --shard full, checkpoint_every 3, 6 steps (the module's, by the CLI).
    summary_sharded = summary(sharded_run)
    assert summary_sharded["parallelism"]["sharding"]["mode"] == "full"
    assert summary_sharded["steps"] == 6
    end = final_weights(tmp_path / "plain")
    # Sharded training is data parallelism: the same steps, up to the order of float sums.
    assert_same_weights(final_weights(sharded_run), end, 1e-5)

    # Saved sharded, resumed as DDP replicas ...
    checkpoint = resumed_from(sharded_run, 3, tmp_path / "to_ddp")
    train(quick_config(corpus, tmp_path / "to_ddp", resume=checkpoint, **steps), nproc=2)
    assert_same_weights(final_weights(tmp_path / "to_ddp"), end, 1e-5)
    assert metrics(tmp_path / "to_ddp")[-1]["loss"] == pytest.approx(
        metrics(tmp_path / "plain")[-1]["loss"], rel=1e-6
    )
    # ... and on one process with the same global batch ...
    checkpoint = resumed_from(sharded_run, 3, tmp_path / "to_one")
    one = quick_config(corpus, tmp_path / "to_one", resume=checkpoint, batch_size=8, **steps)
    train(one, nproc=1)
    assert_same_weights(final_weights(tmp_path / "to_one"), end, 1e-5)
    # ... and saved by DDP replicas, resumed sharded over the grads mode.
    checkpoint = resumed_from(tmp_path / "plain", 3, tmp_path / "to_sharded")
    back = quick_config(corpus, tmp_path / "to_sharded", resume=checkpoint, shard="grads", **steps)
    train(back, nproc=2)
    assert_same_weights(final_weights(tmp_path / "to_sharded"), end, 1e-5)


def test_recompute_and_sharding_wrap_the_same_blocks(
    sharded: tuple[Path, Path, str], tmp_path: Path
) -> None:
    # Recompute checkpoints each block first; sharding then makes each block a unit. The same
    # run as the module's sharded one (6 steps, a checkpoint every 3), with recompute on top.
    corpus, sharded_run, _ = sharded
    both = quick_config(
        corpus, tmp_path / "both", shard="full", recompute="full", max_steps=6, checkpoint_every=3
    )
    assert train(both, nproc=2)["parallelism"]["recompute"] is not None
    # Their workers hand freed large tensors back to the system (memory/measure.py).
    assert summary(sharded_run)["memory"]["mmap_threshold"] == 128 * 1024
    assert_same_weights(final_weights(tmp_path / "both"), final_weights(sharded_run), 0)


@pytest.mark.timeout(300)
def test_a_killed_sharded_worker_restarts_and_the_run_ends_bit_identical(
    sharded: tuple[Path, Path, str], tmp_path: Path
) -> None:
    corpus, whole, whole_stderr = sharded  # the same flags, never killed
    # The testing aid SIGKILLs rank 1 once it finished step 4, on the first attempt only.
    killed = run_train(corpus, tmp_path / "killed", *SHARDED_FLAGS, SHARDWISE_TESTING_KILL="1:4")
    assert killed.returncode == 0, killed.stderr
    assert "Traceback" not in killed.stderr, killed.stderr
    [restart] = summary(tmp_path / "killed")["restarts"]
    assert (restart["rank"], restart["resumed_from_step"]) == (1, 3)
    assert "UserWarning" not in whole_stderr, whole_stderr  # FSDP's view warning: not ours
    assert summary(whole)["parallelism"]["sharding"] == {
        "mode": "full",
        "ranks": 2,
        "replicas": 1,
        "offload": False,
    }
    assert_identical_weights(tmp_path / "killed", whole)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        # Refused by the config, before any worker starts ...
        ("cpu", "--offload moves sharded state from GPU to host memory; on --device cpu"),
        # ... or, where the device is found out, by the workers: still in one line.
        ("auto", "--offload keeps sharded state in host memory for GPU training; this run "),
    ],
)
def test_offload_on_cpu_is_refused_in_one_line(
    corpus: Path, tmp_path: Path, device: str, message: str
) -> None:
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto picks the GPU here, where --offload works")
    refused = run_train(
        corpus, tmp_path / "run", "--shard", "full", "--offload", "--device", device
    )
    assert refused.returncode != 0
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("shardwise: error:") and message in line, refused.stderr


@pytest.mark.timeout(300)
def test_hybrid_shards_inside_each_of_two_machines_and_ends_like_ddp_replicas(
    corpus: Path, tmp_path: Path
) -> None:
    # Two launchers on this machine stand for two machines of 2 workers each: 2 copies of the
    # state, each sharded over one machine's 2 data ranks; 4 x 2 sequences a step.
    steps = ("--batch-size", "2", "--max-steps", "4")
    nodes = ("--shard", "hybrid", "--nnodes", "2", *steps)
    nodes += ("--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    second = start_train(corpus, tmp_path / "hybrid", *nodes, "--node-rank", "1")
    try:
        first = run_train(corpus, tmp_path / "hybrid", *nodes, "--node-rank", "0")
        assert second.wait(timeout=60) == 0 and first.returncode == 0, first.stderr
    finally:
        if second.poll() is None:  # its session's group: the launcher and its workers
            os.killpg(second.pid, signal.SIGKILL)
    assert summary(tmp_path / "hybrid")["parallelism"]["sharding"] == {
        "mode": "hybrid",
        "ranks": 2,
        "replicas": 2,
        "offload": False,
    }
    # The same 4 data ranks as plain DDP replicas on one machine: the same sums, nearly in
    # the same order (2 data ranks of 4 sequences would round differently, as DDP does too).
    plain = run_train(corpus, tmp_path / "plain", "--nproc", "4", *steps)
    assert plain.returncode == 0, plain.stderr
    hybrid = final_weights(tmp_path / "hybrid")
    assert_same_weights(hybrid, final_weights(tmp_path / "plain"), 1e-5)
