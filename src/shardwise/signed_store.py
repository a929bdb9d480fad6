"""The job's store, read only through the job's secret: a value nobody signed is never used.

    store = SignedStore(dist.TCPStore(host, port, is_master=False), job_secret(), f"{host}:{port}")
    store.set("beat/1", "7")      # kept as HMAC-SHA256(secret, key, value) + value
    store.get("beat/1")           # b"7", or ShardwiseError if the bytes there were not signed

The job's TCPStore has no authentication: any process that reaches its port can read and write
every key. So every value our code and torch's rendezvous write through this store carries an
HMAC over its key and bytes, made with a secret only the job's processes know, and every value
read is checked before anything uses it, let alone unpickles it (torch's c10d rendezvous state
is a pickle). A value that fails is one `StoreTampered` line naming the store. Counters
(`add`) are numbers kept by the server and cannot be signed: a forged count can hold a barrier
up until its timeout, never run code or name a process. What the store does not protect is in
the README ("What the job's store protects").
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from shardwise.errors import ShardwiseError

SECRET_ENV = "SHARDWISE_JOB_SECRET"
_MAC_BYTES = 32
# Every SignedStore this process made. torch's C++ side (a PrefixStore, a process group) holds
# only the C++ half of a store written in Python: once the Python object is collected, C++
# calls into it fail ("Tried to call pure virtual function"). A job makes a handful of them.
_LIVE: list[SignedStore] = []


class StoreTampered(ShardwiseError):
    """A value in the job's store was not written by one of the job's processes."""


def new_secret() -> str:
    """A fresh random secret for one job (hex), as the launcher makes for its workers.

    >>> len(new_secret())
    64
    """
    return secrets.token_hex(32)


def job_secret() -> bytes | None:
    """The job's secret from this process's environment, or None where the job has none."""
    value = os.environ.get(SECRET_ENV, "")
    return value.encode() if value else None


def job_tag() -> str | None:
    """A public name for this job (a hash of its secret), the same on every node; None without one.

    >>> job_tag() is None or len(job_tag()) == 16
    True
    """
    secret = job_secret()
    return None if secret is None else hashlib.sha256(b"shardwise job " + secret).hexdigest()[:16]


def read_secret_file(path: str | Path) -> str:
    """The secret in `path`, a file only its owner may read (0600 or 0400), for several nodes.

    Refused in one line when others can read or write it, when it is not ours, or is too short.
    """
    where = Path(path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ShardwiseError(
            f"--job-secret-file {path}: cannot be read ({exc.strerror}); give a regular file "
            "(not a link) holding the job's secret"
        ) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ShardwiseError(f"--job-secret-file {path}: not a regular file")
        if info.st_mode & 0o077 or info.st_uid != os.getuid():
            raise ShardwiseError(
                f"--job-secret-file {path}: mode {stat.S_IMODE(info.st_mode):o} owned by uid "
                f"{info.st_uid}; the file must be yours and readable by you alone "
                f"(chmod 600 {path})"
            )
        text = handle.read(4096).decode("utf-8", "replace").strip()
    if len(text) < 16:
        raise ShardwiseError(
            f"--job-secret-file {path}: the secret is {len(text)} characters; use at least 16 "
            "random ones, e.g. python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    return text


@contextmanager
def job_secret_in_environment(secret_file: str | None, nnodes: int) -> Iterator[None]:
    """While the agent runs: the job's secret in this process's environment, for its workers.

        with job_secret_in_environment(None, nnodes=1):   # a fresh random secret
            elastic_launch(...)

    Workers inherit it from the environment (readable by this user alone in /proc, never in
    argv or a file). One node makes its own; several must share one, from `secret_file` or
    SHARDWISE_JOB_SECRET set on every node. Taken out again afterwards, if it was ours.
    """
    given = os.environ.get(SECRET_ENV)
    if secret_file is not None:
        secret = read_secret_file(secret_file)
    elif given:
        secret = given
    elif nnodes == 1:
        secret = new_secret()
    else:
        raise ShardwiseError(
            f"--nnodes {nnodes}: the nodes sign the job's store with a secret they share; give "
            f"every node --job-secret-file FILE (yours, chmod 600) or export {SECRET_ENV}, "
            "e.g. from python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    os.environ[SECRET_ENV] = secret
    try:
        yield
    finally:
        if given is None:
            os.environ.pop(SECRET_ENV, None)
        else:
            os.environ[SECRET_ENV] = given


class SignedStore(dist.Store):
    """A store whose values carry an HMAC of the job's secret, checked on every read."""

    def __init__(self, inner: dist.Store, secret: bytes, where: str) -> None:
        super().__init__()
        self.inner, self.secret, self.where = inner, secret, where
        _LIVE.append(self)

    def _mac(self, key: str, value: bytes) -> bytes:
        keyed = key.encode()
        message = len(keyed).to_bytes(8, "big") + keyed + value
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def _sign(self, key: str, value: str | bytes) -> bytes:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return self._mac(key, raw) + raw

    def _open(self, key: str, signed: bytes) -> bytes:
        mac, value = signed[:_MAC_BYTES], signed[_MAC_BYTES:]
        if len(signed) < _MAC_BYTES or not hmac.compare_digest(mac, self._mac(key, value)):
            raise StoreTampered(
                f"the job's store at {self.where}: a process that does not know the job's "
                f"secret wrote to it (key {key!r}); the run ends rather than use that value"
            )
        return value

    def set(self, key: str, value: str | bytes) -> None:
        self.inner.set(key, self._sign(key, value))

    def get(self, key: str) -> bytes:
        return self._open(key, self.inner.get(key))

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        # An empty `expected` means "only if the key is absent"; any other is a value we signed.
        old = self._sign(key, expected) if expected not in ("", b"") else b""
        return self._open(key, self.inner.compare_set(key, old, self._sign(key, desired)))

    def multi_get(self, keys: list[str]) -> list[bytes]:
        values = self.inner.multi_get(keys)
        return [self._open(key, value) for key, value in zip(keys, values, strict=True)]

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        self.inner.multi_set(keys, [self._sign(k, v) for k, v in zip(keys, values, strict=True)])

    def add(self, key: str, amount: int) -> int:
        return self.inner.add(key, amount)

    def check(self, keys: list[str]) -> bool:
        return self.inner.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self.inner.wait(keys)
        else:
            self.inner.wait(keys, timeout)

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(key)

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)

    @property
    def timeout(self) -> timedelta:  # type: ignore[override]
        return self.inner.timeout

    def has_extended_api(self) -> bool:
        return True

    def clone(self) -> SignedStore:
        return SignedStore(self.inner.clone(), self.secret, self.where)


def signed(store: dist.Store, where: str) -> dist.Store:
    """`store` read through the job's secret, or as it is where the job has none (own torchrun)."""
    secret = job_secret()
    return store if secret is None else SignedStore(store, secret, where)
