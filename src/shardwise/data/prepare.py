"""From a path (or nothing) to train and held-out sequences, with a note of what was changed.

corpus = prepare_corpus(None, max_len=256, long_sequences="split", eval_fraction=0.05, seed=0)
len(corpus.train), corpus.vocab_size, corpus.notes
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from shardwise.data.cache import cache_path, load_sequences, save_sequences
from shardwise.data.corpus import corpus_fingerprint, read_sequences
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
    path: Path | None,
    max_len: int,
    long_sequences: str,
    eval_fraction: float,
    seed: int,
    cache_dir: Path | None = None,
) -> PreparedCorpus:
    """Read, split, then fit to `max_len` tokens; identical on every rank for the same inputs.

        corpus = prepare_corpus(path, 256, "split", 0.05, seed=0, cache_dir=default_cache_dir())

    Splitting before fitting keeps the chunks of one long document on one side of the split.
    With `cache_dir`, the result is kept there (keyed by the corpus's bytes and every setting
    here) and later calls load it instead of reading and tokenising the corpus again.
    """
    if cache_dir is None:
        return _prepare(path, max_len, long_sequences, eval_fraction, seed)
    entry = cache_path(
        corpus_fingerprint(path),
        cache_dir,
        max_len=max_len,
        long_sequences=long_sequences,
        eval_fraction=eval_fraction,
        seed=seed,
    )
    if (hit := load_sequences(entry)) is not None:
        groups, meta = hit
        return PreparedCorpus(
            groups["train"], groups["eval"], meta["vocab_size"], FitReport(**meta["fit"])
        )
    corpus = _prepare(path, max_len, long_sequences, eval_fraction, seed)
    meta = {"vocab_size": corpus.vocab_size, "fit": asdict(corpus.fit)}
    # An unwritable cache only costs the next run the time to tokenise again.
    with contextlib.suppress(OSError):
        save_sequences(entry, {"train": corpus.train, "eval": corpus.eval}, meta)
    return corpus


def _prepare(
    path: Path | None, max_len: int, long_sequences: str, eval_fraction: float, seed: int
) -> PreparedCorpus:
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
