"""Where the job's store listens, and the torch internals that choice leans on."""

from __future__ import annotations

import inspect
import os
import socket
from datetime import timedelta

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from listeners import listening_sockets
from shardwise.errors import ShardwiseError
from shardwise.stores import (
    LOOPBACK,
    bind_configs,
    free_port,
    host_store,
    loopback_comms,
    rendezvous_backend,
    store_bind_address,
)

pytestmark = pytest.mark.timeout(30)

NOT_HERE = "203.0.113.9"  # TEST-NET-3: documentation only, never a machine's address


def test_one_node_binds_loopback_whatever_the_endpoint_names() -> None:
    assert store_bind_address("nowhere.invalid:29500", nnodes=1) == LOOPBACK
    assert store_bind_address(f"{NOT_HERE}:29500", nnodes=1) == LOOPBACK


def test_several_nodes_bind_the_endpoints_address_on_its_own_machine() -> None:
    assert store_bind_address("127.0.0.1:29500", nnodes=2) == "127.0.0.1"
    assert store_bind_address("localhost:29500", nnodes=2) in ("127.0.0.1", "::1")
    network = _a_network_address()
    if network is not None:
        assert store_bind_address(f"{network}:29500", nnodes=2) == network


def test_other_nodes_only_join_as_clients() -> None:
    assert store_bind_address(f"{NOT_HERE}:29500", nnodes=2) is None


def test_an_unresolvable_endpoint_is_an_error_naming_it() -> None:
    with pytest.raises(ShardwiseError, match=r"--rdzv-endpoint nowhere\.invalid:29500: cannot"):
        store_bind_address("nowhere.invalid:29500", nnodes=2)


def test_a_name_that_is_loopback_only_here_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # As Debian's `127.0.1.1 <hostname>`: the other nodes could never reach the store.
    def resolve(host: str, *args: object, **kwargs: object) -> list:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.1.1", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(ShardwiseError, match=r"node0:29500: node0 is the loopback address"):
        store_bind_address("node0:29500", nnodes=2)


def test_the_agents_store_hook_torch_calls_is_still_there() -> None:
    # stores._SharedStoreHandler overrides it so the agent opens no second, all-interfaces
    # store for the workers; a torch that renames it must fail here, not bind everywhere.
    hook = DynamicRendezvousHandler._create_tcp_store_server
    assert list(inspect.signature(hook).parameters) == ["self", "master_addr", "master_port"]


@pytest.mark.parametrize("share", ["0", "1"], ids=["shared", "TORCH_DISABLE_SHARE_RDZV"])
def test_c10d_rendezvous_opens_one_loopback_store_for_agent_and_workers(
    monkeypatch: pytest.MonkeyPatch, share: str
) -> None:
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", share)
    before = listening_sockets(os.getpid()).get(os.getpid(), set())
    port = free_port()
    handler = get_rendezvous_handler(_params(False, port, join_timeout=10))
    info = handler.next_rendezvous()
    opened = listening_sockets(os.getpid()).get(os.getpid(), set()) - before
    handler.shutdown()
    assert opened == {(LOOPBACK, port)}
    assert handler.use_agent_store  # workers are clients (TORCHELASTIC_USE_AGENT_STORE)
    store = info.bootstrap_store_info
    assert (store.master_addr, store.master_port) == (LOOPBACK, port)


def test_static_rendezvous_opens_one_loopback_store() -> None:
    before = listening_sockets(os.getpid()).get(os.getpid(), set())
    port = free_port()
    handler = get_rendezvous_handler(_params(True, port, rank=0))
    info = handler.next_rendezvous()
    opened = listening_sockets(os.getpid()).get(os.getpid(), set()) - before
    assert opened == {(LOOPBACK, port)}
    assert handler.use_agent_store
    store = info.bootstrap_store_info
    assert (store.master_addr, store.master_port) == (LOOPBACK, port)


def test_static_node_rank_zero_away_from_the_endpoint_is_an_error() -> None:
    params = _params(True, 29500, nnodes=2, host=NOT_HERE, rank=0)
    with pytest.raises(ShardwiseError, match=rf"{NOT_HERE}:29500: --node-rank 0 hosts"):
        get_rendezvous_handler(params).next_rendezvous()


@pytest.mark.parametrize("static", [False, True], ids=["c10d", "static"])
def test_a_taken_port_is_the_one_line_error(static: bool) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ShardwiseError, match=f"port {port} is already in use"):
            get_rendezvous_handler(_params(static, port, rank=0)).next_rendezvous()


def test_host_store_serves_on_the_given_address_only() -> None:
    store = host_store(LOOPBACK, 0, timedelta(seconds=5))
    store.set("key", "value")
    assert store.get("key") == b"value"
    mine = listening_sockets(os.getpid())[os.getpid()]
    assert {address for address, port in mine if port == store.port} == {LOOPBACK}


def test_gloo_listens_on_loopback_only_while_a_one_node_job_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    with loopback_comms(nnodes=2):
        assert "GLOO_SOCKET_IFNAME" not in os.environ
    with loopback_comms(nnodes=1):
        assert os.environ["GLOO_SOCKET_IFNAME"] in ("lo", "lo0")
    assert "GLOO_SOCKET_IFNAME" not in os.environ
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # the user's choice stands
    with loopback_comms(nnodes=1):
        assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"


def _params(
    static: bool, port: int, nnodes: int = 1, host: str = "localhost", **config: object
) -> RendezvousParameters:
    endpoint = f"{host}:{port}"
    return RendezvousParameters(
        backend=rendezvous_backend(static),
        endpoint=endpoint,
        run_id="stores-test",
        min_nodes=nnodes,
        max_nodes=nnodes,
        **bind_configs(endpoint, nnodes),
        **config,
    )


def _a_network_address() -> str | None:
    """This machine's address on its default route, if it has one (UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((NOT_HERE, 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address
