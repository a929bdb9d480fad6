"""A corpus of heavy-tailed sequence lengths, made from the embedded one, for benchmarks.

path = write_heavy_tailed(Path("heavy.txt"))   # then `shardwise train --data heavy.txt`
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardwise.data.corpus import default_paragraphs


def write_heavy_tailed(path: Path, seed: int = 0) -> Path:
    """The embedded corpus's text cut again into paragraphs of Pareto-distributed length (most
    a sentence or two, a few thousands of characters): the same words, heavy-tailed lengths."""
    text = " ".join(" ".join(default_paragraphs()).split())
    rng = np.random.default_rng(seed)
    pieces, start = [], 0
    while start < len(text):
        length = int(min(40 + rng.pareto(1.1) * 120, 4000))
        pieces.append(text[start : start + length])
        start += length
    path.write_text("\n\n".join(pieces) + "\n", encoding="utf-8")
    return path
