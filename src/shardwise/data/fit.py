"""Fit sequences to a model's length limits, and hold out an evaluation split.

    fitted, report = fit_to_max_length(sequences, max_len=512)
    train, held_out = split_train_eval(fitted, eval_fraction=0.1, seed=0)

Sequences longer than `max_len` are split into consecutive chunks (or truncated); sequences
shorter than `min_len` are dropped, since a language model needs two tokens for one target.
`FitReport` counts what changed so the user can be told in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from shardwise.errors import ShardwiseError

POLICIES = ("split", "truncate")
MAX_EVAL_FRACTION = 0.5

T = TypeVar("T")


@dataclass(frozen=True)
class FitReport:
    """What `fit_to_max_length` changed; `describe()` says it in one line.

    report.n_split, report.tokens_dropped   # (12, 40)
    print(report.describe() or "all sequences fit")
    """

    n_input: int
    n_output: int
    n_split: int  # sequences longer than max_len cut into consecutive chunks ("split")
    n_truncated: int  # sequences cut to max_len, the rest discarded ("truncate")
    n_dropped_short: int  # input sequences shorter than min_len, dropped
    tokens_dropped: int  # by truncation, short sequences and short split tails
    max_len: int
    min_len: int

    def describe(self) -> str:
        """One line for the user, e.g. "12 sequences longer than 512 tokens were split into
        chunks; 3 shorter than 2 tokens dropped"; empty if nothing changed.

            report.describe()   # "" when every sequence already fit
        """
        parts = []
        if self.n_split:
            parts.append(
                f"{_sequences(self.n_split)} longer than {self.max_len} tokens "
                f"{_was(self.n_split)} split into chunks"
            )
        if self.n_truncated:
            parts.append(
                f"{_sequences(self.n_truncated)} longer than {self.max_len} tokens "
                f"{_was(self.n_truncated)} truncated"
            )
        if self.n_dropped_short:
            parts.append(f"{self.n_dropped_short} shorter than {self.min_len} tokens dropped")
        if self.tokens_dropped:
            noun = "token" if self.tokens_dropped == 1 else "tokens"
            parts.append(f"{self.tokens_dropped} {noun} discarded in all")
        return "; ".join(parts)


def fit_to_max_length(
    sequences: list[np.ndarray], max_len: int, policy: str = "split", min_len: int = 2
) -> tuple[list[np.ndarray], FitReport]:
    """Make every sequence between `min_len` and `max_len` tokens long, keeping their order.

        fitted, report = fit_to_max_length([np.arange(5)], max_len=2)
        # fitted: [0 1], [2 3]; the 1-token tail [4] is dropped (report.tokens_dropped == 1)

    policy "split" cuts a long sequence into consecutive chunks of at most `max_len` (chunks
    take their source's place) and drops a tail shorter than `min_len`; "truncate" keeps the
    first `max_len` tokens. Outputs are views of the inputs, not copies.
    """
    if policy not in POLICIES:
        raise ShardwiseError(f"unknown length policy {policy!r}; use one of {', '.join(POLICIES)}")
    if min_len < 1 or max_len < min_len:
        raise ShardwiseError(
            f"max length {max_len} must be at least the minimum length {min_len} (itself >= 1); "
            "raise the max length"
        )
    fitted: list[np.ndarray] = []
    n_split = n_truncated = n_dropped_short = tokens_dropped = 0
    for sequence in sequences:
        length = len(sequence)
        if length < min_len:
            n_dropped_short += 1
            tokens_dropped += length
        elif length <= max_len:
            fitted.append(sequence)
        elif policy == "truncate":
            n_truncated += 1
            tokens_dropped += length - max_len
            fitted.append(sequence[:max_len])
        else:
            n_split += 1
            for start in range(0, length, max_len):
                chunk = sequence[start : start + max_len]
                if len(chunk) >= min_len:
                    fitted.append(chunk)
                else:
                    tokens_dropped += len(chunk)
    report = FitReport(
        n_input=len(sequences),
        n_output=len(fitted),
        n_split=n_split,
        n_truncated=n_truncated,
        n_dropped_short=n_dropped_short,
        tokens_dropped=tokens_dropped,
        max_len=max_len,
        min_len=min_len,
    )
    return fitted, report


def split_train_eval(
    sequences: Sequence[T], eval_fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """Hold out a seeded random `eval_fraction` of sequences; both parts keep input order.

        train, held_out = split_train_eval(sequences, eval_fraction=0.1, seed=0)
        # same split in every process and run for the same sequences and seed

    At least one sequence is held out when `eval_fraction > 0` and there are two or more.
    Split before `fit_to_max_length` so chunks of one document never land on both sides.
    """
    if not 0.0 <= eval_fraction <= MAX_EVAL_FRACTION:
        raise ShardwiseError(
            f"eval fraction {eval_fraction} is outside [0, {MAX_EVAL_FRACTION}]; "
            "pick e.g. 0.05 to hold out 5% of sequences, or 0 for none"
        )
    count = len(sequences)
    n_eval = round(count * eval_fraction)
    if eval_fraction > 0 and count >= 2:
        # Rounding can give 0 for small corpora; <= 0.5 still leaves at least one to train on.
        n_eval = max(1, n_eval)
    # PCG64 behind default_rng gives the same permutation on every platform for a seed.
    held_out = np.zeros(count, dtype=bool)
    held_out[np.random.default_rng(seed).permutation(count)[:n_eval]] = True
    train = [item for item, out in zip(sequences, held_out, strict=True) if not out]
    evaluation = [item for item, out in zip(sequences, held_out, strict=True) if out]
    return train, evaluation


def _sequences(count: int) -> str:
    return f"{count} sequence" if count == 1 else f"{count} sequences"


def _was(count: int) -> str:
    return "was" if count == 1 else "were"
