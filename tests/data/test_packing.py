"""Packing sequences into rows: first-fit decreasing, and the packed batch the model sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardwise.data.batch import IGNORE_INDEX, PADDING_SEGMENT, collate, pack_collate
from shardwise.data.loader import RequestDataset
from shardwise.data.packing import pack_rows
from shardwise.data.sampler import BatchRequest


def test_pack_rows_fills_first_fit_decreasing_within_the_row() -> None:
    assert pack_rows(np.array([5, 3, 4, 2]), row_len=8) == [[0, 1], [2, 3]]
    assert pack_rows(np.array([6, 6, 2]), row_len=8) == [[0, 2], [1]]
    lengths = np.random.default_rng(0).integers(1, 50, size=200)
    rows = pack_rows(lengths, row_len=64)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(lengths[row].sum() <= 64 for row in rows)
    assert sum(64 - lengths[row].sum() for row in rows) < 64 * 2  # at most ~2 rows of room


def test_pack_rows_refuses_a_sequence_longer_than_the_row() -> None:
    with pytest.raises(ValueError, match="does not fit rows of 4"):
        pack_rows(np.array([5]), row_len=4)


def test_packed_targets_never_cross_into_the_next_sequence() -> None:
    sequences = [np.array([10, 11, 12, 13, 14]), np.array([20, 21, 22]), np.array([30, 31])]
    batch = pack_collate(sequences, step_tokens=7, row_len=8)
    assert batch.tokens.tolist() == [[10, 11, 12, 13, 20, 21, 30]]
    assert batch.targets.tolist() == [[11, 12, 13, 14, 21, 22, 31]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 0, 1, 0]]
    assert batch.segment_ids.tolist() == [[0, 0, 0, 0, 1, 1, 2]]
    assert (batch.n_tokens, batch.n_slots, batch.packed) == (7, 7, True)


def test_rows_default_to_the_longest_sequence_and_padding_is_its_own_segment() -> None:
    batch = pack_collate([np.arange(5), np.arange(3), np.arange(2)], step_tokens=7)
    assert batch.segment_ids.tolist() == [[0, 0, 0, 0], [0, 0, 1, PADDING_SEGMENT]]
    assert batch.targets[1, 3] == IGNORE_INDEX
    assert sorted(batch.lengths.tolist()) == [1, 2, 4]


def test_model_kwargs_carry_what_each_kind_of_batch_needs() -> None:
    packed = pack_collate([np.arange(5), np.arange(3)], step_tokens=6, row_len=8)
    assert set(packed.model_kwargs(torch.device("cpu"))) == {"positions", "segment_ids"}
    with pytest.raises(ValueError, match="model_kwargs"):
        packed.model_lengths(torch.device("cuda"))  # lengths alone would mix its sequences
    ragged = collate([np.arange(5), np.arange(3)], step_tokens=6)
    assert ragged.model_kwargs(torch.device("cpu")) == {}
    assert set(ragged.model_kwargs(torch.device("cuda"))) == {"lengths"}


def test_to_moves_the_packing_tensors_too() -> None:
    batch = pack_collate([np.arange(5), np.arange(3)], 6, row_len=8).to(torch.device("meta"))
    assert batch.positions.device.type == batch.segment_ids.device.type == "meta"


def test_the_dataset_packs_when_asked_and_keeps_the_predicted_costs() -> None:
    sequences = [np.arange(6), np.arange(3), np.arange(4)]
    request = BatchRequest((0, 1, 2), step_tokens=10, position=(0, 3), rank_costs=(1.0, 2.0))
    packed = RequestDataset(sequences, packing=True)[request]
    padded = RequestDataset(sequences)[request]
    assert packed.packed and not padded.packed
    assert packed.rank_costs == padded.rank_costs == (1.0, 2.0)
    assert packed.n_tokens == padded.n_tokens == 10
    assert packed.n_slots < padded.n_slots


def test_rows_of_one_sequence_each_are_a_plain_padded_batch() -> None:
    batch = pack_collate([np.arange(6), np.arange(5)], step_tokens=9)
    assert not batch.packed
    assert (
        batch.tokens.tolist()
        == collate([np.arange(6), np.arange(5)], step_tokens=9).tokens.tolist()
    )
