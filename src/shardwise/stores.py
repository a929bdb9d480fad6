"""Host the job's key-value store on one interface: loopback for one node, else the endpoint's.

    rdzv_configs = {"join_timeout": 60, **bind_configs("localhost:29500", nnodes=1)}
    LaunchConfig(rdzv_backend=rendezvous_backend(static=False), rdzv_configs=rdzv_configs, ...)

torch's own rendezvous handlers listen on every interface (`*:PORT`, IPv4 and IPv6), whatever
host the endpoint names, and the agent opens a second such store for the workers (MASTER_PORT).
The store has no authentication of its own: whoever reaches it can read and write every key of
the job. So every value is signed with the job's secret and checked on every read
(shardwise.signed_store), and we register torch's own handlers under our names
(`rendezvous_backend`), handed a store we bound ourselves (TCPStore's `master_listen_fd`) on
the one address `store_bind_address` picks, and point the workers at that same store, as clients.
`loopback_comms` keeps a one-node job's gloo sockets on loopback too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
    RendezvousTimeout,
)
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from shardwise.config import parse_endpoint
from shardwise.distributed import ATTEMPT_ENV
from shardwise.errors import ShardwiseError, first_line
from shardwise.signed_store import signed
from shardwise.waiting import waiting_for_nodes

LOOPBACK = "127.0.0.1"
C10D_BACKEND = "shardwise-c10d"
STATIC_BACKEND = "shardwise-static"
_BIND_KEY = "bind_address"
# What torch's own handlers default to (c10d_rendezvous_backend, static_tcp_rendezvous).
_C10D_READ_TIMEOUT_S = 60
_STATIC_TIMEOUT_S = 600
# The timeouts torch's create_handler reads, in RendezvousTimeout's argument order.
_TIMEOUT_KEYS = ("join", "last_call", "close", "heartbeat")


def store_bind_address(endpoint: str, nnodes: int) -> str | None:
    """The local address this machine's store listens on, or None if it only joins as a client.

        store_bind_address("node0:29500", nnodes=1)     # '127.0.0.1': one node needs no network
        store_bind_address("10.0.0.5:29500", nnodes=2)  # '10.0.0.5' on that machine, else None

    Several nodes: the machine the endpoint names listens on that address (the first of its
    resolved addresses that is this machine's); the others find none here and only join.
    """
    if nnodes == 1:
        return LOOPBACK
    host, _ = parse_endpoint(endpoint)
    try:
        resolved = [info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    except (socket.gaierror, UnicodeError) as exc:
        raise ShardwiseError(
            f"--rdzv-endpoint {endpoint}: cannot resolve {host!r} ({exc}); give the address of "
            "the node that hosts the rendezvous"
        ) from None
    local = next((address for address in resolved if _is_local(address)), None)
    if local is not None and _is_loopback(local) and not _is_loopback(host):
        # e.g. Debian's `127.0.1.1 <hostname>`: the other nodes resolve the name elsewhere.
        raise ShardwiseError(
            f"--rdzv-endpoint {endpoint}: {host} is the loopback address {local} on this "
            "machine, which the other nodes cannot reach; give this machine's network address "
            "(or 127.0.0.1 if every node runs on this machine)"
        )
    return local


def bind_configs(endpoint: str, nnodes: int) -> dict[str, str]:
    """The rendezvous settings that tell our handlers where (and whether) to host the store."""
    return {_BIND_KEY: store_bind_address(endpoint, nnodes) or ""}


def rendezvous_backend(static: bool) -> str:
    """Our c10d (or static) rendezvous backend's name, registered with torch on first use."""
    if not callable(getattr(DynamicRendezvousHandler, "_create_tcp_store_server", None)):
        # Without this hook the agent would open its workers' store on every interface again.
        raise RuntimeError(
            "this torch's DynamicRendezvousHandler has no _create_tcp_store_server; "
            "shardwise.stores must be updated before the job's store can stay off the network"
        )
    rendezvous_handler_registry.register(C10D_BACKEND, _create_c10d_handler)
    rendezvous_handler_registry.register(STATIC_BACKEND, _StaticStoreHandler)
    return STATIC_BACKEND if static else C10D_BACKEND


@contextlib.contextmanager
def loopback_comms(nnodes: int) -> Iterator[None]:
    """While workers of a one-node job start, have gloo listen on loopback (unless set already).

    gloo listens on the address this machine's hostname resolves to, often a network one.
    """
    name = _loopback_interface()
    if nnodes > 1 or name is None or "GLOO_SOCKET_IFNAME" in os.environ:
        yield
        return
    os.environ["GLOO_SOCKET_IFNAME"] = name  # spawned workers copy the launcher's environment
    try:
        yield
    finally:
        os.environ.pop("GLOO_SOCKET_IFNAME", None)


def port_in_use(endpoint: str, port: int, single_node: bool = True) -> ShardwiseError:
    """The error for a rendezvous port something else already holds on this machine."""
    free = " or leave --rdzv-endpoint out to use a free one" if single_node else ""
    return ShardwiseError(
        f"--rdzv-endpoint {endpoint}: port {port} is already in use; pick another port{free}"
    )


def host_store(
    address: str, port: int, timeout: timedelta, world_size: int | None = None
) -> dist.TCPStore:
    """A TCPStore server listening on `address:port` only; OSError if that cannot be bound."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "posix":  # as TCPStore's own server does: rebind over TIME_WAIT at once
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(socket.SOMAXCONN)
        store = dist.TCPStore(
            address,
            port,
            world_size,
            True,
            timeout,
            multi_tenant=True,
            master_listen_fd=listener.fileno(),
        )
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now and closes it
    return store


class _SharedStoreHandler(DynamicRendezvousHandler):
    """torch's c10d rendezvous, whose workers use its store instead of one on every interface."""

    workers_store: RendezvousStoreInfo
    rendezvous_store: dist.TCPStore

    def _create_tcp_store_server(self, master_addr: str, master_port: int) -> dist.TCPStore:
        # torch asks for a new store for the workers here (on every interface, port 0); only its
        # port is read, for the MASTER_PORT that next_rendezvous below replaces anyway.
        return self.rendezvous_store

    def get_backend(self) -> str:
        return C10D_BACKEND  # the registry checks that a handler reports the name it was made for

    @property
    def use_agent_store(self) -> bool:
        # Workers join our store as clients (TORCHELASTIC_USE_AGENT_STORE) and never host one,
        # even under TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
        return True

    endpoint: str
    nnodes: int
    rounds: int = 0

    def next_rendezvous(self) -> RendezvousInfo:
        # Arrivals are counted in the first round only: after a restart every node is back.
        counter = self.rendezvous_store if self.rounds == 0 else None
        self.rounds += 1
        # torch reads the workers' store address from round-scoped keys that rank 0 writes only
        # in its own first round: a node arriving in a later one (--nnodes MIN:MAX) would wait
        # for them forever. Ours is known already, and returned below.
        self._bootstrap_store_info = self.workers_store
        with waiting_for_nodes(counter, self.endpoint, self.nnodes) as joined:
            info = super().next_rendezvous()
            joined.append(info.world_size)  # nodes: fewer than nnodes after an elastic shrink
        # The workers' attempt number (shardwise.distributed.attempt_number): the same round on
        # every node; they inherit the agent's environment.
        os.environ[ATTEMPT_ENV] = str(self._state_holder.state.round)
        return RendezvousInfo(info.store, info.rank, info.world_size, self.workers_store)


class _StaticStoreHandler(StaticTCPRendezvous):
    """torch's static rendezvous (--node-rank), on a store bound by `host_store`."""

    def __init__(self, params: RendezvousParameters) -> None:
        host, port = parse_rendezvous_endpoint(params.endpoint, default_port=-1)
        rank, timeout = int(params.config["rank"]), params.config.get("timeout", _STATIC_TIMEOUT_S)
        super().__init__(host, port, rank, params.max_nodes, params.run_id, int(timeout))
        self.endpoint = params.endpoint
        self.bind_address = str(params.config[_BIND_KEY])
        self.single_node = params.max_nodes == 1
        self._own_store: dist.TCPStore | None = None
        self._signed_store: dist.Store  # the same, read through the job's secret
        self._store_address = host

    def get_backend(self) -> str:
        return STATIC_BACKEND

    def next_rendezvous(self) -> RendezvousInfo:
        # As StaticTCPRendezvous.next_rendezvous, with the store made here instead.
        if self._own_store is None:
            with waiting_for_nodes(None, self.endpoint, self.world_size):
                self._own_store, self._store_address = self._open_store()
            where = f"{self._store_address}:{self.master_port}"
            self._signed_store = signed(self._own_store, where)
        return RendezvousInfo(
            dist.PrefixStore(self.run_id, self._signed_store),
            self.rank,
            self.world_size,
            RendezvousStoreInfo(self._store_address, self.master_port),
        )

    def _open_store(self) -> tuple[dist.TCPStore, str]:
        if self.rank != 0:
            return _join_store(self.master_addr, self.master_port, self.timeout, self.world_size)
        if not self.bind_address:
            raise ShardwiseError(
                f"--rdzv-endpoint {self.endpoint}: --node-rank 0 hosts the rendezvous, but "
                f"{self.master_addr} is not an address of this machine; run node rank 0 on "
                "the endpoint's machine or give one of this machine's addresses"
            )
        try:
            store = host_store(self.bind_address, self.master_port, self.timeout, self.world_size)
        except OSError:
            raise port_in_use(self.endpoint, self.master_port, self.single_node) from None
        except (RuntimeError, ValueError) as exc:  # the other nodes did not connect in time
            raise RendezvousConnectionError(f"static rendezvous: {first_line(exc)}") from exc
        return store, self.bind_address


def _create_c10d_handler(params: RendezvousParameters) -> RendezvousHandler:
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=-1)
    bind = str(params.config[_BIND_KEY])
    timeout = timedelta(seconds=int(params.get("read_timeout", _C10D_READ_TIMEOUT_S)))
    store, address = None, host
    if bind:
        try:
            store, address = host_store(bind, port, timeout), bind
        except OSError:
            if params.max_nodes == 1:
                raise port_in_use(params.endpoint, port, single_node=True) from None
            # Another agent of this job on this machine hosts it already; torch's c10d backend
            # falls back to a client the same way.
    if store is None:
        store, address = _join_store(host, port, timeout)
    # torch's rendezvous state is a pickle: it reads it only through the job's secret.
    checked = signed(store, f"{address}:{port}")
    handler = _SharedStoreHandler.from_backend(
        params.run_id,
        checked,
        C10dRendezvousBackend(checked, params.run_id),
        params.min_nodes,
        params.max_nodes,
        params.local_addr,
        RendezvousTimeout(*(_seconds(params, f"{key}_timeout") for key in _TIMEOUT_KEYS)),
        keep_alive_interval=int(params.get("keep_alive_interval", 5)),
        keep_alive_max_attempt=int(params.get("keep_alive_max_attempt", 3)),
    )
    handler.rendezvous_store = store
    handler.workers_store = RendezvousStoreInfo(address, port)
    handler.endpoint, handler.nnodes = params.endpoint, params.max_nodes
    return handler


def _join_store(
    host: str, port: int, timeout: timedelta, world_size: int | None = None
) -> tuple[dist.TCPStore, str]:
    try:
        return dist.TCPStore(host, port, world_size, False, timeout), host
    except (RuntimeError, ValueError) as exc:
        raise RendezvousConnectionError(f"store at {host}:{port}: {first_line(exc)}") from exc


def _seconds(params: RendezvousParameters, key: str) -> timedelta | None:
    value = params.get_as_int(key)
    return None if value is None else timedelta(seconds=value)


def _is_local(address: str) -> bool:
    """Whether `address` belongs to this machine: only then can a socket bind to it."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _loopback_interface() -> str | None:
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def check_port_free(endpoint: str) -> None:
    """Fail clearly, before any worker starts, if a one-node run's rendezvous port is taken.

    Probes loopback, where a one-node run's store listens whatever host the endpoint names.
    """
    _, port = parse_endpoint(endpoint)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            raise port_in_use(endpoint, port) from None
