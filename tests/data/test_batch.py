import numpy as np
import torch

from shardwise.data.batch import IGNORE_INDEX, collate


def test_collate_shifts_targets_and_pads_with_ignore_index() -> None:
    batch = collate([np.array([5, 6, 7, 8]), np.array([1, 2])], step_tokens=4)
    assert batch.tokens.tolist() == [[5, 6, 7], [1, 0, 0]]
    assert batch.targets.tolist() == [[6, 7, 8], [2, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.lengths.tolist() == [3, 1]
    assert (batch.n_tokens, batch.n_slots, batch.padded) == (4, 6, True)


def test_lengths_reach_the_model_only_when_packing_pays() -> None:
    ragged = collate([np.array([1, 2, 3]), np.array([1, 2])], step_tokens=3)
    even = collate([np.array([1, 2, 3]), np.array([4, 5, 6])], step_tokens=4)
    assert even.model_lengths(torch.device("cuda")) is None
    assert ragged.model_lengths(torch.device("cuda")).tolist() == [2, 1]  # targets per row
    assert ragged.model_lengths(torch.device("cpu")) is None
