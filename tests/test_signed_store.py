"""The job's store, read through its secret: signed values pass, every other value is named."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from shardwise.errors import ShardwiseError
from shardwise.signed_store import (
    SECRET_ENV,
    SignedStore,
    StoreTampered,
    job_secret_in_environment,
    read_secret_file,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def server() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5))


def signed(server: dist.TCPStore, secret: bytes = b"k" * 32) -> SignedStore:
    return SignedStore(server, secret, f"127.0.0.1:{server.port}")


def test_what_the_job_writes_it_reads_back(server) -> None:
    store = signed(server)
    store.set("a", "1")
    assert store.get("a") == b"1"
    assert store.compare_set("b", "", "x") == b"x"  # absent: set
    assert store.compare_set("b", "x", "y") == b"y"  # as expected: swapped
    assert store.compare_set("b", "z", "w") == b"y"  # not as expected: the current value
    store.multi_set(["c", "d"], ["3", b"4"])
    assert store.multi_get(["c", "d"]) == [b"3", b"4"]
    prefixed = dist.PrefixStore("ns", store)  # what torch and our namespaces put on top
    prefixed.set("e", "5")
    assert prefixed.get("e") == b"5"


@pytest.mark.parametrize(
    "forge",
    [
        lambda raw, ours: raw.set("a", b"garbage"),
        lambda raw, ours: raw.set("a", b""),
        lambda raw, ours: raw.set("a", ours.get_raw("other")),  # a signed value, moved
        lambda raw, ours: raw.set("a", SignedStore(raw, b"x" * 32, "-")._sign("a", "1")),
    ],
    ids=["garbage", "empty", "moved-from-another-key", "another-secret"],
)
def test_a_value_the_job_did_not_sign_for_that_key_is_named(server, forge) -> None:
    store = signed(server)
    store.set("other", "1")
    store.get_raw = lambda key: server.get(key)  # type: ignore[attr-defined]
    forge(server, store)
    for read in (
        lambda: store.get("a"),
        lambda: store.multi_get(["a"]),
        lambda: store.compare_set("a", "1", "2"),
    ):
        with pytest.raises(StoreTampered, match="a process that does not know the job's secret"):
            read()


def test_one_node_makes_a_fresh_secret_and_takes_it_away_after(monkeypatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with job_secret_in_environment(None, nnodes=1):
        first = os.environ[SECRET_ENV]
    assert SECRET_ENV not in os.environ
    with job_secret_in_environment(None, nnodes=1):
        assert os.environ[SECRET_ENV] != first and len(first) == 64


def test_several_nodes_need_a_secret_they_share(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with (
        pytest.raises(ShardwiseError, match="--job-secret-file"),
        job_secret_in_environment(None, nnodes=2),
    ):
        pass
    monkeypatch.setenv(SECRET_ENV, "given")
    with job_secret_in_environment(None, nnodes=2):
        assert os.environ[SECRET_ENV] == "given"
    assert os.environ[SECRET_ENV] == "given"
    secret = tmp_path / "secret"
    secret.write_text("s" * 40 + "\n")
    secret.chmod(0o600)
    with job_secret_in_environment(str(secret), nnodes=2):
        assert os.environ[SECRET_ENV] == "s" * 40


def test_a_secret_file_others_could_read_or_that_is_a_link_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 40)
    secret.chmod(0o644)
    with pytest.raises(ShardwiseError, match="chmod 600"):
        read_secret_file(secret)
    secret.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(secret)
    with pytest.raises(ShardwiseError, match="not a link"):
        read_secret_file(link)
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    with pytest.raises(ShardwiseError, match="at least 16"):
        read_secret_file(short)
    assert read_secret_file(secret) == "s" * 40
