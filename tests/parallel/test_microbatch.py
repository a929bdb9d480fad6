"""Batch shaping for pipelines: even micro-batches, bucketed lengths, exact padding."""

from __future__ import annotations

import pytest
import torch

from shardwise.data.batch import IGNORE_INDEX
from shardwise.parallel.microbatch import bucket_length, pad_batch, rows_for


@pytest.mark.parametrize(
    ("length", "bucket", "max_len", "want"),
    [(37, 32, None, 64), (64, 32, None, 64), (37, 32, 40, 40), (37, 1, None, 37), (50, 32, 40, 50)],
)
def test_bucket_length_rounds_up_but_not_past_max_len(
    length: int, bucket: int, max_len: int | None, want: int
) -> None:
    assert bucket_length(length, bucket, max_len) == want


@pytest.mark.parametrize(("rows", "parts", "want"), [(8, 4, 8), (10, 4, 12), (2, 4, 4), (1, 1, 1)])
def test_rows_for_splits_evenly(rows: int, parts: int, want: int) -> None:
    assert rows_for(rows, parts) == want


def test_pad_batch_pads_tokens_with_zero_and_targets_with_ignore() -> None:
    tokens = torch.arange(6).view(2, 3)
    targets = tokens + 10
    padded_tokens, padded_targets = pad_batch(tokens, targets, rows=3, length=5)
    assert padded_tokens.tolist() == [[0, 1, 2, 0, 0], [3, 4, 5, 0, 0], [0] * 5]
    assert padded_targets[:2, :3].tolist() == targets.tolist()
    assert (padded_targets[2] == IGNORE_INDEX).all() and (
        padded_targets[:, 3:] == IGNORE_INDEX
    ).all()


def test_pad_batch_returns_a_batch_of_the_right_shape_unchanged() -> None:
    tokens = torch.ones(2, 3, dtype=torch.long)
    assert pad_batch(tokens, tokens, rows=2, length=3)[0] is tokens
