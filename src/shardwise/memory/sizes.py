"""Byte sizes as people write them: "6GiB", "512MB", "1.5 GB", or a plain count of bytes.

    >>> parse_size("6GiB")
    6442450944
    >>> parse_size("512MB"), parse_size(4096)
    (512000000, 4096)
    >>> format_size(3 * 2**30)
    '3.00 GiB'

Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB, MB, GB, TB) of 1000,
as `free --si` and a cloud provider's "16 GB" mean them; K, M, G, T alone are binary, as
`ulimit` and Kubernetes' "Gi" read them. Torch-free: the config parses `--memory-budget` with it.
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": 2**30,
    "gib": 2**30,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(value: object) -> int:
    """Bytes for `value`: an int, or text such as "6GiB", "512MB", "1.5G"; ValueError otherwise.

    >>> parse_size("1.5 GiB")
    1610612736
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    match = _SIZE.fullmatch(str(value))
    unit = match and match.group(2).lower()
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{value!r} is not a size: write bytes, or a number with KiB, MiB, GiB, TiB "
            "(binary), KB, MB, GB, TB (decimal), e.g. 6GiB or 512MB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """A byte count in MiB below 1 GiB, otherwise in GiB (negative counts keep their sign).

    >>> format_size(512 * 2**20), format_size(-3 * 2**20)
    ('512.0 MiB', '-3.0 MiB')
    """
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"
