"""Every setting a Session reads is one `shardwise.setup()` takes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import shardwise
from shardwise.config import TrainConfig
from shardwise.session import SESSION_KEYS

pytestmark = pytest.mark.timeout(60)

SESSION_SOURCE = Path(shardwise.__file__).with_name("session.py").read_text()


def test_every_config_field_the_session_reads_is_a_setup_keyword() -> None:
    read = set(re.findall(r"config\.([a-z_]+)", SESSION_SOURCE))
    fields = read & set(TrainConfig.model_fields)
    assert fields and fields <= set(SESSION_KEYS), sorted(fields - set(SESSION_KEYS))


def test_setup_takes_keep_checkpoints(tmp_path: Path) -> None:
    session = shardwise.setup(keep_checkpoints=3, device="cpu")
    assert session.config.keep_checkpoints == 3
