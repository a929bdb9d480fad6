"""Shape a batch for a pipeline: rows split evenly into micro-batches, lengths in few buckets.

    tokens, targets = pad_batch(batch.tokens, batch.targets, rows=8, length=64)
    length = bucket_length(batch.tokens.shape[1], bucket=32, max_len=256)   # 37 -> 64

A pipeline stage receives activations into buffers allocated for one shape, so every
micro-batch of a step must have the same shape, and a new shape costs new buffers. Padding
rows up to a multiple of the micro-batch count and lengths up to a bucket keeps the number of
shapes small. Padding is exact for causal models: padded positions carry IGNORE_INDEX targets,
and trailing padding never reaches a real position.
"""

from __future__ import annotations

import torch

from shardwise.loss import IGNORE_INDEX


def bucket_length(length: int, bucket: int, max_len: int | None = None) -> int:
    """`length` rounded up to a multiple of `bucket`, but never above `max_len`.

    >>> bucket_length(37, 32), bucket_length(37, 32, max_len=40), bucket_length(37, 1)
    (64, 40, 37)
    """
    rounded = -(-length // bucket) * bucket
    return max(length, min(rounded, max_len)) if max_len is not None else rounded


def pad_batch(
    tokens: torch.Tensor, targets: torch.Tensor, rows: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad `tokens` with 0 and `targets` with IGNORE_INDEX to `rows` x `length`.

    >>> ones = torch.ones(3, 5, dtype=torch.long)
    >>> t, y = pad_batch(ones, ones, rows=4, length=8)
    >>> t.shape, int(y[3, 0]), int(y[0, 7])
    (torch.Size([4, 8]), -100, -100)
    """
    have_rows, have_length = tokens.shape
    if (have_rows, have_length) == (rows, length):
        return tokens, targets
    padded_tokens = tokens.new_zeros(rows, length)
    padded_targets = targets.new_full((rows, length), IGNORE_INDEX)
    padded_tokens[:have_rows, :have_length] = tokens
    padded_targets[:have_rows, :have_length] = targets
    return padded_tokens, padded_targets


def rows_for(batch_rows: int, microbatches: int) -> int:
    """The smallest row count >= `batch_rows` that splits into `microbatches` equal parts.

    >>> rows_for(10, 4), rows_for(2, 4)
    (12, 4)
    """
    return -(-batch_rows // microbatches) * microbatches
