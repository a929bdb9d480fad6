"""Length fitting (split / truncate / drop short) and the seeded train/eval split."""

from __future__ import annotations

import numpy as np
import pytest

from shardwise.data.fit import FitReport, fit_to_max_length, split_train_eval
from shardwise.errors import ShardwiseError


def _lists(arrays):
    return [a.tolist() for a in arrays]


def test_split_cuts_long_sequences_into_chunks_in_place_and_drops_short_tail():
    sequences = [np.arange(3), np.arange(10, 17), np.array([5]), np.arange(20, 24)]
    fitted, report = fit_to_max_length(sequences, max_len=3)
    assert _lists(fitted) == [
        [0, 1, 2],
        [10, 11, 12],
        [13, 14, 15],  # 16 is a 1-token tail, dropped
        [20, 21, 22],  # 23 likewise
    ]
    assert report == FitReport(
        n_input=4,
        n_output=4,
        n_split=2,
        n_truncated=0,
        n_dropped_short=1,
        tokens_dropped=3,
        max_len=3,
        min_len=2,
    )


def test_split_keeps_tails_of_at_least_min_len():
    fitted, report = fit_to_max_length([np.arange(8)], max_len=3)
    assert _lists(fitted) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert (report.n_split, report.n_output, report.tokens_dropped) == (1, 3, 0)


def test_truncate_keeps_the_first_max_len_tokens():
    sequences = [np.arange(10), np.arange(2), np.array([], dtype=np.uint8)]
    fitted, report = fit_to_max_length(sequences, max_len=4, policy="truncate")
    assert _lists(fitted) == [[0, 1, 2, 3], [0, 1]]
    assert (report.n_truncated, report.n_split, report.n_dropped_short) == (1, 0, 1)
    assert report.tokens_dropped == 6
    assert report.n_output == 2


def test_min_len_drops_short_sequences():
    sequences = [np.arange(n) for n in (1, 2, 3, 4)]
    fitted, report = fit_to_max_length(sequences, max_len=10, min_len=3)
    assert _lists(fitted) == [[0, 1, 2], [0, 1, 2, 3]]
    assert (report.n_dropped_short, report.tokens_dropped) == (2, 3)


def test_nothing_to_do_describes_as_empty():
    sequences = [np.arange(4), np.arange(2)]
    fitted, report = fit_to_max_length(sequences, max_len=4)
    assert fitted[0] is sequences[0]
    assert report.describe() == ""


def test_describe_is_one_readable_line():
    sequences = [np.arange(5), np.arange(6), np.array([1])]
    _, report = fit_to_max_length(sequences, max_len=3)
    text = report.describe()
    assert "\n" not in text
    assert text.startswith("2 sequences longer than 3 tokens were split into chunks")
    assert "1 shorter than 2 tokens dropped" in text
    assert text.endswith("; 1 token discarded in all")
    _, report = fit_to_max_length([np.arange(5)], max_len=3, policy="truncate")
    assert report.describe().startswith("1 sequence longer than 3 tokens was truncated")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_len": 8, "policy": "pad"}, "unknown length policy"),
        ({"max_len": 1}, "max length 1"),
        ({"max_len": 4, "min_len": 0}, "minimum length 0"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, match):
    with pytest.raises(ShardwiseError, match=match):
        fit_to_max_length([np.arange(4)], **kwargs)


def test_split_train_eval_is_deterministic_disjoint_and_complete():
    sequences = [np.array([i, i]) for i in range(100)]
    train, held_out = split_train_eval(sequences, eval_fraction=0.1, seed=3)
    again_train, again_held_out = split_train_eval(sequences, eval_fraction=0.1, seed=3)
    ids = lambda part: [int(a[0]) for a in part]  # noqa: E731
    assert ids(train) == ids(again_train) and ids(held_out) == ids(again_held_out)
    assert len(held_out) == 10
    assert set(ids(train)).isdisjoint(ids(held_out))
    assert sorted(ids(train) + ids(held_out)) == list(range(100))
    assert ids(train) == sorted(ids(train))  # input order kept
    _, other_held_out = split_train_eval(sequences, eval_fraction=0.1, seed=4)
    assert ids(other_held_out) != ids(held_out)


def test_split_train_eval_holds_out_at_least_one_and_leaves_one():
    assert [len(p) for p in split_train_eval(["a", "b"], 0.01, seed=0)] == [1, 1]
    # round(3 * 0.5) == 2 held out (half to even), which still leaves one to train on.
    assert [len(p) for p in split_train_eval(["a", "b", "c"], 0.5, seed=0)] == [1, 2]
    assert split_train_eval(["a"], 0.5, seed=0) == (["a"], [])
    assert split_train_eval(["a", "b"], 0.0, seed=0) == (["a", "b"], [])


@pytest.mark.parametrize("fraction", [-0.1, 0.6, float("nan")])
def test_split_train_eval_rejects_fraction_outside_range(fraction):
    with pytest.raises(ShardwiseError, match="eval fraction"):
        split_train_eval(["a", "b"], fraction, seed=0)
