"""From a path (or nothing) to train and held-out sequences, with a note of what was changed.

corpus = prepare_corpus(None, max_len=256, long_sequences="split", eval_fraction=0.05, seed=0)
len(corpus.train), corpus.vocab_size, corpus.notes
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from shardwise.data.corpus import read_sequences
from shardwise.data.fit import FitReport, fit_to_max_length, split_train_eval
from shardwise.data.tokenize import VOCAB_SIZE
from shardwise.errors import ShardwiseError


@dataclass(frozen=True)
class PreparedCorpus:
    """Training and held-out sequences, the vocabulary they need and what fitting changed."""

    train: list[np.ndarray]
    eval: list[np.ndarray]
    vocab_size: int
    fit: FitReport

    @property
    def notes(self) -> str:
        return self.fit.describe()


def prepare_corpus(
    path: Path | None, max_len: int, long_sequences: str, eval_fraction: float, seed: int
) -> PreparedCorpus:
    """Read, split, then fit to `max_len` tokens; identical on every rank for the same inputs.

    Splitting before fitting keeps the chunks of one long document on one side of the split.
    """
    raw_train, raw_eval = split_train_eval(read_sequences(path), eval_fraction, seed)
    train, train_report = fit_to_max_length(raw_train, max_len, long_sequences)
    held_out, eval_report = fit_to_max_length(raw_eval, max_len, long_sequences)
    if not train:
        source = path or "the default corpus"
        raise ShardwiseError(f"--data {source}: no training sequence has the 2 tokens needed")
    largest = max(int(seq.max()) for seq in train + held_out)
    return PreparedCorpus(
        train, held_out, max(VOCAB_SIZE, largest + 1), _sum_reports(train_report, eval_report)
    )


def _sum_reports(first: FitReport, second: FitReport) -> FitReport:
    counts = {
        f.name: getattr(first, f.name) + getattr(second, f.name)
        for f in fields(FitReport)
        if f.name.startswith(("n_", "tokens_"))
    }
    return replace(first, **counts)
