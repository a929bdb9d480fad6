"""A slow link on the real network stack, for tests and benchmarks: ranks in network namespaces.

    with linked_namespaces(2, Link(delay_ms=5, rate_mbit=80)) as net:
        subprocess.run(net.command(0, ["shardwise", "train", ...]))  # node 0: net.addresses[0]

Testing aid, never a user setting. Each "node" is a network namespace with loopback up and one
veth interface, addressed 10.213.0.<i+1>/24: two nodes are joined by one veth pair, more by a
bridge that lives in its own hub namespace, so the host's own interfaces are never touched. Every
node's outgoing traffic is shaped by `tc`: `netem delay D rate R` where the kernel has netem,
else a token bucket (`tbf rate R`) without the delay, which `Namespaces.shaping` says. Leaving the
context removes every namespace (and with them every link), also after an error.

Needs root and iproute2 (`ip`, `tc`); `unavailable()` says why not. Where namespaces cannot be
made, the fallback is an injected sleep per exchange in the workers:
`fallback_environment(link)` sets SHARDWISE_TESTING_COLLECTIVE_DELAY_S, which
shardwise/train/faults.py honours (its `SlowLink`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from shardwise.stores import free_port
from shardwise.train.faults import COLLECTIVE_DELAY_ENV

SUBNET = "10.213.0"


@dataclass(frozen=True)
class Link:
    """What each node's outgoing traffic goes through: one-way delay and a rate cap (None: none)."""

    delay_ms: float = 0.0
    rate_mbit: float | None = None

    def describe(self) -> str:
        rate = f"{self.rate_mbit:g} Mbit/s" if self.rate_mbit else "no rate cap"
        return f"{self.delay_ms:g} ms delay, {rate}"


@dataclass
class Namespaces:
    """Nodes made by `linked_namespaces`: names, addresses, interfaces, how the link is shaped."""

    names: list[str]
    interfaces: list[str]
    addresses: list[str] = field(default_factory=list)
    shaping: str = "none"  # "netem", "tbf (rate only: this kernel has no netem, no delay)"
    hub: str | None = None

    def command(self, node: int, argv: list[str]) -> list[str]:
        """`argv` run inside node `node`'s namespace (environment and working dir are kept)."""
        return ["ip", "netns", "exec", self.names[node], *argv]

    def environment(self, node: int) -> dict[str, str]:
        """Variables a worker there needs: gloo on the node's veth, not on an unreachable name."""
        return {"GLOO_SOCKET_IFNAME": self.interfaces[node]}

    def sent_bytes(self, node: int) -> int:
        """Bytes node `node` has sent over its link so far (the kernel's counter)."""
        shown = subprocess.run(
            [
                "ip",
                "-n",
                self.names[node],
                "-s",
                "-j",
                "link",
                "show",
                "dev",
                self.interfaces[node],
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(json.loads(shown.stdout)[0]["stats64"]["tx"]["bytes"])


@dataclass(frozen=True)
class NodeRun:
    """A `train_on_nodes` job: rank 0's summary.json (None if it wrote none), each node's exit
    status and the tail of its output."""

    summary: dict | None
    returncodes: list[int]
    outputs: list[str]

    @property
    def ok(self) -> bool:
        return self.summary is not None and not any(self.returncodes)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None when they can): root, `ip`, `tc`."""
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2)"
    probe = f"swprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    _ip("netns", "del", probe)
    return None


@contextlib.contextmanager
def linked_namespaces(nodes: int, link: Link, tag: str | None = None) -> Iterator[Namespaces]:
    """`nodes` namespaces on one shaped network; all removed on leaving, error or not."""
    if not 2 <= nodes <= 250:
        raise ValueError(f"nodes={nodes}: between 2 and 250 namespaces on one /24")
    tag = tag or str(os.getpid() % 100000)  # interface names must stay under 16 characters
    net = Namespaces(
        names=[f"sw{tag}n{i}" for i in range(nodes)],
        interfaces=[f"sw{tag}v{i}" for i in range(nodes)],
        hub=f"sw{tag}hub" if nodes > 2 else None,
    )
    try:
        for name in [*net.names, *([net.hub] if net.hub else [])]:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _wire(net)
        for node, (name, interface) in enumerate(zip(net.names, net.interfaces, strict=True)):
            net.addresses.append(f"{SUBNET}.{node + 1}")
            _ip("-n", name, "addr", "add", f"{net.addresses[-1]}/24", "dev", interface)
            _ip("-n", name, "link", "set", interface, "up")
        set_link(net, link)
        yield net
    finally:
        remove_namespaces(net)


def _wire(net: Namespaces) -> None:
    """A veth pair between the two nodes, or from each node to a bridge in the hub."""
    if net.hub is None:
        (a, b), (va, vb) = net.names, net.interfaces
        _ip("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        return
    bridge = "br0"
    _ip("-n", net.hub, "link", "add", bridge, "type", "bridge")
    _ip("-n", net.hub, "link", "set", bridge, "up")
    for node, (name, interface) in enumerate(zip(net.names, net.interfaces, strict=True)):
        port = f"port{node}"
        _ip("link", "add", interface, "netns", name, "type", "veth", "peer", port, "netns", net.hub)
        _ip("-n", net.hub, "link", "set", port, "master", bridge, "up")


def set_link(net: Namespaces, link: Link) -> None:
    """Shape every node's outgoing traffic as `link` from now on (Link(): unshaped again)."""
    for name, interface in zip(net.names, net.interfaces, strict=True):
        tc = ["ip", "netns", "exec", name, "tc", "qdisc"]
        subprocess.run([*tc, "del", "dev", interface, "root"], capture_output=True)  # if any
        net.shaping = _shape([*tc, "add", "dev", interface, "root"], link)


def _shape(tc: list[str], link: Link) -> str:
    """Add the qdisc: netem if the kernel has it, else tbf for the rate alone."""
    if not link.delay_ms and not link.rate_mbit:
        return "none"
    netem = [*tc, "netem", "delay", f"{link.delay_ms:g}ms", "limit", "100000"]
    if link.rate_mbit:
        netem += ["rate", f"{link.rate_mbit:g}mbit"]
    if subprocess.run(netem, capture_output=True).returncode == 0:
        return "netem"
    if not link.rate_mbit:
        raise RuntimeError("this kernel has no netem qdisc, and a delay alone needs it")
    # Half a second of queue at the rate: TCP bursts wait rather than being dropped.
    burst, queue = max(64_000, int(link.rate_mbit * 1e6 / 8 / 100)), int(link.rate_mbit * 1e6 / 16)
    _run([*tc, "tbf", "rate", f"{link.rate_mbit:g}mbit", "burst", str(burst), "limit", str(queue)])
    return "tbf (rate only: this kernel has no netem, so no delay)"


def remove_namespaces(net: Namespaces) -> None:
    """Delete `net`'s namespaces (their veths go with them); quiet about ones never made."""
    present = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    )
    for name in [*net.names, *([net.hub] if net.hub else [])]:
        if name in present:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def fallback_environment(link: Link) -> dict[str, str]:
    """The injected-delay stand-in for `link`: SHARDWISE_TESTING_COLLECTIVE_DELAY_S=S:MBIT.

    After each step a rank then sleeps a round trip (2 x the delay) per exchange its sync
    strategy started plus their bytes at the link's rate (see shardwise/train/faults.py).
    """
    rate = f":{link.rate_mbit:g}" if link.rate_mbit else ""
    return {COLLECTIVE_DELAY_ENV: f"{2 * link.delay_ms / 1000:g}{rate}"}


def pin(core: int) -> None:
    """Run this process (and what it starts) on `core` alone."""
    os.sched_setaffinity(0, {core})


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def train_on_nodes(
    net: Namespaces | None,
    train_args: list[str],
    run_dir: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
    one_node: bool = False,
) -> NodeRun:
    """`shardwise train` with one process on each node of `net` (None: 2 nodes on loopback).

        result = train_on_nodes(net, ["--max-steps", "4"], tmp_path / "run", timeout_s=120)

    Node i writes to `run_dir`/node{i}; rank 0's summary.json lands in node0. The rendezvous is
    static, on node 0's address at a random port (a free one on loopback). Node i is pinned to
    core i (modulo the cores here), as if each node were its own machine: its worker then takes
    one thread rather than the whole machine's, which the nodes would oversubscribe. `one_node`:
    a plain one-node job (its --nproc in `train_args`) in node 0 alone, on every core, for what
    cannot span nodes.
    """
    cores = sorted(os.sched_getaffinity(0))
    nodes = 1 if one_node else 2 if net is None else len(net.names)
    host = "127.0.0.1" if net is None else net.addresses[0]
    port = free_port() if net is None else random.randint(20000, 60000)  # a fresh namespace
    processes = []
    # The nodes of one job sign its store with one secret, as real nodes must.
    secret = {
        "SHARDWISE_JOB_SECRET": os.environ.get("SHARDWISE_JOB_SECRET") or secrets.token_hex(32)
    }
    for node in range(nodes):
        argv = [sys.executable, "-m", "shardwise", "train", *train_args]
        argv += ["--run-dir", str(run_dir / f"node{node}"), "--overwrite"]
        if not one_node:
            argv += ["--nnodes", str(nodes), "--node-rank", str(node), "--nproc", "1"]
            argv += ["--rdzv-endpoint", f"{host}:{port}"]
        local = {"GLOO_SOCKET_IFNAME": "lo"} if net is None else net.environment(node)
        processes.append(
            subprocess.Popen(
                argv if net is None else net.command(node, argv),
                env={**os.environ, **secret, **(env or {}), **({} if one_node else local)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=None if one_node else partial(pin, cores[node % len(cores)]),
            )
        )
    outputs, deadline = [], time.monotonic() + timeout_s
    try:
        for process in processes:
            left = max(1.0, deadline - time.monotonic())
            outputs.append(process.communicate(timeout=left)[0][-4000:])
    finally:
        for process in processes:  # after a timeout: nothing outlives the job
            if process.poll() is None:
                process.kill()
                process.wait()
    summary_file = run_dir / "node0" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    return NodeRun(summary, [process.returncode for process in processes], outputs)
