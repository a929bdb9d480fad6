"""--shard and --offload: the combinations that cannot work are refused in one line before any
worker starts, the layout learns its shard degree, and the entry says what it does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallel_cases import tiny_model
from shardwise.cli import main
from shardwise.config import build_config
from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import Layout
from shardwise.parallel.sharding import Sharding, shard_model, shard_units
from shardwise.techniques import freeing_within_a_step
from shardwise.techniques.base import Footprint
from shardwise.techniques.sharding import SHARDING

MULTI = {"nnodes": 2, "rdzv_endpoint": "h:1"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"shard": "full", "sync": "local-sgd"},
            "--shard full does not work with --sync local-sgd (its replicas step apart, and "
            "sharded state is one copy): drop --sync or --shard",
        ),
        ({"shard": "grads", "sync": "diloco"}, "--shard grads does not work with --sync diloco"),
        ({"shard": "full", "sync": "async", "ps": 1}, "--shard full does not work with --sync"),
        (
            {"shard": "full", "grad_compression": "bf16"},
            "--shard full does not work with --grad-compression bf16 (it compresses DDP's "
            "all-reduce): drop --grad-compression or --shard",
        ),
        ({"shard": "full", "grad_compression": "fp16"}, "does not work with --grad-compression"),
        ({"shard": "full", "grad_compression": "powersgd"}, "does not work with --grad-comp"),
        ({"shard": "full", "precision": "fp16"}, "use --precision bf16"),
        ({"shard": "full", "bucket_mb": 10.0}, "--bucket-mb 10.0 has no effect with --shard full"),
        (
            {"shard": "full", "nnodes": "1:2", "rdzv_endpoint": "h:1"},
            "--shard full does not work with --nnodes 1:2 yet",
        ),
        (
            {"shard": "hybrid"},
            "--shard hybrid shards inside a machine and replicates across machines, but "
            "--nnodes is 1: use --shard full",
        ),
        ({"shard": "hybrid", "tp": 2, **MULTI}, "--shard hybrid does not work with --tp yet"),
        (
            {"shard": "full", "offload": True, "device": "cpu"},
            "--offload moves sharded state from GPU to host memory; on --device cpu it is "
            "there already: drop --offload",
        ),
        ({"offload": True}, "--offload has no effect with --shard none"),
        ({"shard": "zero"}, "shard (--shard) = 'zero'"),
    ],
)
def test_what_sharding_cannot_do_is_refused_in_one_line(values: dict, message: str) -> None:
    with pytest.raises(ShardwiseError) as caught:
        build_config(values)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("values", "world", "shard", "replicas"),
    [
        ({}, 4, 1, 4),
        ({"shard": "full"}, 4, 4, 1),
        ({"shard": "grads", "pp": 2}, 4, 2, 1),  # each stage over its own 2 data ranks
        ({"shard": "hybrid", **MULTI}, 8, 4, 2),  # 4 ranks a machine
        ({"shard": "hybrid", "pp": 2, **MULTI}, 8, 2, 2),
    ],
)
def test_the_layout_shards_over_every_data_rank_or_one_machines(
    values: dict, world: int, shard: int, replicas: int
) -> None:
    layout = build_config(values).layout(world)
    assert (layout.shard, layout.replicas, layout.data_ranks) == (shard, replicas, layout.dp)


def test_hybrid_needs_data_ranks_that_split_evenly_over_the_machines() -> None:
    config = build_config({"shard": "hybrid", "nnodes": 3, "rdzv_endpoint": "h:1"})
    with pytest.raises(ShardwiseError, match="4 data ranks do not split evenly over --nnodes 3"):
        config.layout(4)


def test_the_entry_describes_and_records_the_sharding() -> None:
    config = build_config({"shard": "hybrid", **MULTI})
    entry = SHARDING.entry(config, config.layout(8))
    assert entry.describe() == "sharding: hybrid over 4 data ranks, 2 copies (HSDP)"
    assert entry.record() == {"mode": "hybrid", "ranks": 4, "replicas": 2, "offload": False}
    assert SHARDING.entry(build_config({}), Layout(dp=2)) is None


def test_grads_mode_keeps_parameters_whole_and_gathers_once_a_step() -> None:
    parts = {"parameters": 900, "gradients": 900, "optimizer": 1800, "activations": 50}
    footprint = Footprint(parts, Layout(dp=3, shard=3), blocks=3)
    full = SHARDING.cost(Sharding("full", 3), footprint)
    grads = SHARDING.cost(Sharding("grads", 3), footprint)
    # A block's backward: its parameters and the next block's gathered, its gradients whole and
    # their reduce-scatter copy (4 mean blocks of 300); grads mode only the gradients' two.
    assert full.memory == {
        "parameters": -600, "gradients": -600, "optimizer": -1200, "buffers": 1200
    }  # fmt: skip
    assert "parameters" not in grads.memory and grads.memory["optimizer"] == -1200
    assert grads.memory["buffers"] == 600
    assert (full.step_bytes, grads.step_bytes) == (1800, 1200)  # (2 or 1 gathers + 1) x 2/3
    assert SHARDING.cost(Sharding("full", 1), Footprint(parts, Layout(dp=2))).memory == {}


def test_offload_takes_the_shards_off_the_device_but_not_the_gathered_blocks() -> None:
    parts = {"parameters": 900, "gradients": 900, "optimizer": 1800}
    footprint = Footprint(parts, Layout(dp=3, shard=3), blocks=3)
    offloaded = SHARDING.cost(Sharding("full", 3, offload=True), footprint)
    assert offloaded.memory == {
        "parameters": -900, "gradients": -900, "optimizer": -1800, "buffers": 1200
    }  # fmt: skip


def test_offload_on_a_cpu_model_is_refused_where_the_device_is_known() -> None:
    with pytest.raises(ShardwiseError) as caught:
        shard_model(tiny_model("gru"), Sharding("full", 2, offload=True), Layout(dp=2, shard=2))
    assert str(caught.value) == (
        "--offload keeps sharded state in host memory for GPU training; this run trains on "
        "cpu: drop --offload"
    )


def test_blocks_are_sharded_one_by_one_and_tied_weights_stay_with_the_root() -> None:
    recurrent = tiny_model("gru")
    assert [type(unit).__name__ for unit in shard_units(recurrent)] == [
        "Embedding", "GRU", "GRU", "GRU", "Sequential"
    ]  # fmt: skip
    tied = torch.nn.Sequential(
        torch.nn.Embedding(8, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 8)
    )
    tied[2].weight = tied[0].weight
    assert shard_units(tied) == [tied[1]]


@pytest.mark.timeout(120)
def test_a_dry_run_says_how_the_state_is_sharded(
    corpus: Path, capsys: pytest.CaptureFixture
) -> None:
    flags = ["--data", str(corpus), "--model", "gru", "--nproc", "2", "--shard", "grads"]
    assert main(["train", "--dry-run", *flags]) == 0
    out = capsys.readouterr().out
    assert "sharding: grads over 2 data ranks (ZeRO-2-like)" in out
    assert "holds the whole model" not in out and "its state sharded" in out


def test_sharding_and_recompute_say_their_saving_is_freed_within_each_step() -> None:
    # On CPU such a run's workers fix glibc's mmap threshold (memory/measure.py).
    full = build_config({"shard": "full", "nproc": 2})
    assert freeing_within_a_step(full, full.layout(2)) == ["sharding"]
    recompute = build_config({"recompute": "full"})
    assert freeing_within_a_step(recompute, recompute.layout(1)) == ["recompute"]
    plain = build_config({})
    assert freeing_within_a_step(plain, plain.layout(2)) == []


def test_a_blocks_gradient_copies_count_beyond_the_activations_its_backward_frees() -> None:
    parts = {"parameters": 900, "gradients": 900, "optimizer": 1800, "activations": 5000}
    held = Footprint(parts, Layout(dp=3, shard=3), activations_per_block=500, blocks=3)
    # Blocks of 300: two gathered, and 2 x 300 of gradients less the block's 500 freed.
    assert SHARDING.cost(Sharding("full", 3), held).memory["buffers"] == 600 + 100
    assert SHARDING.cost(Sharding("grads", 3), held).memory["buffers"] == 100
    heavy = Footprint(parts, Layout(dp=3, shard=3), activations_per_block=5000, blocks=3)
    assert SHARDING.cost(Sharding("full", 3), heavy).memory["buffers"] == 600


def test_a_model_of_one_unit_is_gathered_once_with_nothing_to_prefetch() -> None:
    parts = {"parameters": 900, "gradients": 900, "optimizer": 1800}
    whole = Footprint(parts, Layout(dp=3, shard=3), activations_per_block=5000, blocks=1)
    assert SHARDING.cost(Sharding("full", 3), whole).memory["buffers"] == 900
