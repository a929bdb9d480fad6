"""The synchronisation flags: their rules refuse bad combinations before any worker starts."""

from __future__ import annotations

import typing

import pytest

from shardwise.config import TrainConfig, build_config
from shardwise.errors import ShardwiseError
from shardwise.parallel.sync import DiLoCo, PeriodicAveraging, SyncOptions, sync_strategy
from shardwise.techniques.sync import SYNC


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"sync": "local-sgd", "grad_compression": "bf16"},
            "--grad-compression bf16 compresses --sync allreduce's gradients; --sync local-sgd "
            "sends parameters: drop --grad-compression",
        ),
        (
            {"grad_compression": "powersgd", "pp": 2},
            "--grad-compression works through DDP, which only whole-model replicas use; drop "
            "it, or use --pp 1 --tp 1",
        ),
        (
            {"sync": "diloco", "tp": 2},
            "--sync diloco does not average tensor-parallel shards yet; use --tp 1",
        ),
        (
            {"sync": "local-sgd", "precision": "fp16"},
            "--sync local-sgd lets replicas step apart, so their fp16 loss scales would drift",
        ),
        ({"sync_every": 0}, "sync_every (--sync-every) = 0: Input should be greater than"),
        ({"powersgd_warmup_steps": 1}, "powersgd_warmup_steps (--powersgd-warmup-steps) = 1"),
        ({"outer_momentum": 1.0}, "outer_momentum (--outer-momentum) = 1.0"),
        ({"sync": "gossip"}, "sync (--sync) = 'gossip'"),
        ({"sync": "async"}, "--sync async needs parameter servers: add --ps 1"),
        ({"sync_groups": "node"}, "--sync-groups node has no effect with --sync allreduce"),
        ({"ps": 2}, "--ps 2 serves --sync async: drop --ps"),
        ({"sync": "async", "ps": 1, "pp": 2}, "--sync async does not work with --pp yet"),
        (
            {"sync": "async", "ps": 1, "nnodes": 2, "rdzv_endpoint": "h:1"},
            "--sync async does not work with --nnodes yet (servers and workers run on one",
        ),
        (
            {"sync": "async", "ps": 1, "checkpoint_every": 5},
            "--sync async does not work with --checkpoint-every yet (the servers hold the "
            "optimizer state, which checkpoints do not keep yet)",
        ),
        ({"sync": "async", "ps": 1, "resume": "runs/x"}, "does not work with --resume yet"),
        ({"sync": "async", "ps": 1, "tp": 2}, "--sync async does not average tensor-parallel"),
        ({"sync": "async", "ps": 1, "precision": "fp16"}, "fp16 loss scales would drift"),
        ({"sync": "async", "ps": 1, "max_staleness": -1}, "max_staleness (--max-staleness)"),
    ],
)
def test_bad_sync_settings_are_refused_in_one_line(values: dict, message: str) -> None:
    with pytest.raises(ShardwiseError) as caught:
        build_config(values)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_pipeline_stages_may_average_periodically() -> None:
    config = TrainConfig(sync="diloco", pp=2, sync_every=4)
    assert SYNC.entry(config, None).options.sync_every == 4


def test_the_flags_reach_the_strategy() -> None:
    config = TrainConfig(
        sync="diloco", sync_every=5, sync_warmup_steps=2, outer_lr=0.5, outer_bf16=True
    )
    strategy = SYNC.entry(config, None)
    assert isinstance(strategy, DiLoCo)
    assert strategy.options == SyncOptions(
        sync_every=5, sync_warmup_steps=2, outer_lr=0.5, outer_momentum=0.9, outer_bf16=True
    )
    assert isinstance(sync_strategy("local-sgd"), PeriodicAveraging)


def test_a_strategy_alone_counts_its_steps_and_keeps_them_as_a_tensor() -> None:
    strategy = PeriodicAveraging(SyncOptions(sync_every=2))
    strategy.steps = 3
    state = strategy.state_dict()
    assert state["steps"].dim() == 0
    fresh = PeriodicAveraging()
    fresh.load_state_dict(state)
    assert fresh.steps == 3


def test_the_declared_strategies_are_the_ones_that_exist() -> None:
    from shardwise.parallel.sync import SYNC_STRATEGIES
    from shardwise.techniques.sync import STRATEGIES

    assert set(STRATEGIES) == set(SYNC_STRATEGIES)
    assert set(typing.get_args(SYNC.settings[0].type)) == set(SYNC_STRATEGIES)
