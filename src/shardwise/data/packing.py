"""Pack several sequences into each row of a batch, so short sequences stop costing padding.

    rows = pack_rows(np.array([5, 3, 4, 2]), row_len=8)   # [[0, 1], [2, 3]]: 8 and 6 tokens

A packed row is only correct for a model that keeps its sequences apart: attention limited to
each sequence's own tokens and positions restarting at 0 for each (see `pack_collate` in
batch.py and `TransformerLM`). Recurrent models skip padding with `PackedSequence` instead.
"""

from __future__ import annotations

import numpy as np


def pack_rows(lengths: np.ndarray, row_len: int) -> list[list[int]]:
    """Sample indices per row, filled first-fit decreasing; no row holds over `row_len` tokens.

    pack_rows(np.array([6, 6, 2]), row_len=8)   # [[0, 2], [1]]

    The longest sequences are placed first, each in the first row with room, which leaves
    little room unused when there are short sequences to fill the gaps. A sequence longer
    than `row_len` is refused: cut sequences to the model's length first.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > row_len:
        raise ValueError(f"a sequence of {lengths.max()} tokens does not fit rows of {row_len}")
    rows: list[list[int]] = []
    room: list[int] = []
    for sample in np.argsort(-lengths, kind="stable"):
        length = int(lengths[sample])
        row = next((r for r, free in enumerate(room) if free >= length), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(row_len)
        rows[row].append(int(sample))
        room[row] -= length
    return rows
