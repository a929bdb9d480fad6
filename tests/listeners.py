"""Which TCP sockets a process tree listens on, read from /proc (Linux only, no dependencies).

    listeners = listening_sockets(os.getpid())   # {pid: {("127.0.0.1", 29500), ...}}
    with watch_listeners(os.getpid()) as seen: ...   # everything listened on meanwhile

Also a model factory, `listeners:snapshot_then_gru`, that records the listeners of the whole job
from inside a worker: it runs after the worker joined its process group, while the launcher's
stores and every rank's gloo sockets are open, so what it sees cannot have come too early.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from shardwise.models import RecurrentLM

SNAPSHOT_DIR_ENV = "SHARDWISE_TEST_LISTENERS_DIR"
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


def listening_sockets(root_pid: int) -> dict[int, set[tuple[str, int]]]:
    """The (address, port) each process of `root_pid`'s tree listens on, by pid."""
    listening = _listening_by_inode()
    found: dict[int, set[tuple[str, int]]] = {}
    for pid in process_tree(root_pid):
        addresses = {listening[inode] for inode in _socket_inodes(pid) if inode in listening}
        if addresses:
            found[pid] = addresses
    return found


@contextlib.contextmanager
def watch_listeners(root_pid: int, every_s: float = 0.02) -> Iterator[dict[int, set]]:
    """Every (address, port) `root_pid`'s tree listened on while the block ran, by pid."""
    seen: dict[int, set[tuple[str, int]]] = {}
    stop = threading.Event()

    def poll() -> None:
        while True:
            for pid, found in listening_sockets(root_pid).items():
                seen.setdefault(pid, set()).update(found)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)


def process_tree(root_pid: int) -> list[int]:
    """`root_pid` and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command name sits in parentheses and may itself hold spaces or ')'.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def snapshot_then_gru(vocab_size: int) -> RecurrentLM:
    """A tiny GRU, built after this worker recorded the listeners of the launcher's whole tree.

    The launcher builds the model once too, before workers start (to probe how it is called):
    there it records nothing.
    """
    if "RANK" in os.environ:
        _record_listeners(os.environ["RANK"])
    return RecurrentLM(vocab_size, embed_dim=16, hidden_dim=16, num_layers=1, cell="gru")


def _record_listeners(rank: str) -> None:
    launcher = os.getppid()  # the elastic agent spawned this worker
    snapshot = {
        "launcher": launcher,
        "worker": os.getpid(),
        "listeners": {
            str(pid): sorted(found) for pid, found in listening_sockets(launcher).items()
        },
    }
    Path(os.environ[SNAPSHOT_DIR_ENV], f"rank{rank}.json").write_text(json.dumps(snapshot))


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:  # closed between listing and reading
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _listening_by_inode() -> dict[int, tuple[str, int]]:
    found = {}
    for table, decode in (("/proc/net/tcp", _ipv4), ("/proc/net/tcp6", _ipv6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:  # a kernel without IPv6
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == _LISTEN:
                address, port = fields[1].split(":")
                found[int(fields[9])] = (decode(address), int(port, 16))
    return found


def _ipv4(hex_address: str) -> str:
    return str(ipaddress.IPv4Address(_network_order(hex_address)))


def _ipv6(hex_address: str) -> str:
    return str(ipaddress.IPv6Address(_network_order(hex_address)))


def _network_order(hex_address: str) -> bytes:
    # The kernel prints the address as 32-bit words, each as this machine's integer reading of
    # network-order bytes: turning each word back into native bytes restores network order.
    words = [hex_address[i : i + 8] for i in range(0, len(hex_address), 8)]
    return b"".join(int(word, 16).to_bytes(4, sys.byteorder) for word in words)
