"""Every setting a Session reads is one `shardwise.setup()` takes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import shardwise
from shardwise.config import TrainConfig
from shardwise.errors import ShardwiseError
from shardwise.session import SESSION_KEYS

pytestmark = pytest.mark.timeout(60)

SESSION_SOURCE = Path(shardwise.__file__).with_name("session.py").read_text()


def test_every_config_field_the_session_reads_is_a_setup_keyword() -> None:
    read = set(re.findall(r"config\.([a-z_]+)", SESSION_SOURCE))
    fields = read & set(TrainConfig.model_fields)
    assert fields and fields <= set(SESSION_KEYS), sorted(fields - set(SESSION_KEYS))


def test_setup_takes_keep_checkpoints(tmp_path: Path) -> None:
    session = shardwise.setup(keep_checkpoints=3, device="cpu")
    assert session.settings.keep_checkpoints == 3


def test_every_session_setting_is_a_setup_keyword() -> None:
    from dataclasses import fields

    from shardwise.session import SessionSettings

    names = {f.name for f in fields(SessionSettings)} - {"contract"}
    names |= {"vocab_size", "input_layout", "model_output"}  # the contract's settings
    assert names <= set(SESSION_KEYS), sorted(names - set(SESSION_KEYS))
    session = shardwise.setup(device="cpu", seed=7, timeout_s=30, model="gru", vocab_size=300)
    assert session.settings.seed == 7 and session.settings.timeout_s == 30
    assert session.settings.contract["vocab_size"] == 300 and session.settings.model == "gru"


def test_hybrid_sharding_is_reachable_from_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardwise.session import _session_config

    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # as torchrun sets them
    monkeypatch.setenv("MASTER_PORT", "29500")
    # Given: two machines of two processes each, shard inside a machine.
    assert _session_config(None, {"shard": "hybrid", "nnodes": 2}).layout(4).shard == 2
    # Started by torchrun on two machines, the machines come from its environment.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    config = _session_config(None, {"shard": "hybrid"})
    assert config.nnodes == 2 and config.layout(4).shard == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one machine: nothing to replicate across
    with pytest.raises(ShardwiseError, match="--nnodes is 1: use --shard full"):
        _session_config(None, {"shard": "hybrid"})
