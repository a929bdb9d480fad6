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
from shardwise.data.vocabulary import MOST_INFERRED_VOCAB, run_vocab_size
from shardwise.errors import ShardwiseError


@dataclass(frozen=True)
class PreparedCorpus:
    """Training and held-out sequences, the run's vocabulary and what fitting changed."""

    train: list[np.ndarray]
    eval: list[np.ndarray]
    vocab_size: int  # every id below it (data/vocabulary.py); what the model is built with
    fit: FitReport
    largest_id: int = 255  # the largest token id read, before splitting and fitting
    source: Path | None = None  # the file read (None: the default corpus), to find an id again

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
    vocab_size: int | None = None,
    infer_up_to: int = MOST_INFERRED_VOCAB,
) -> PreparedCorpus:
    """Read, split, then fit to `max_len` tokens; identical on every rank for the same inputs.

        corpus = prepare_corpus(path, 256, "split", 0.05, seed=0, cache_dir=default_cache_dir())

    Splitting before fitting keeps the chunks of one long document on one side of the split.
    With `cache_dir`, the result is kept there (keyed by the corpus's bytes and every setting
    here but the vocabulary) and later calls load it instead of reading and tokenising the
    corpus again. `vocab_size` (--vocab-size) must hold every token id; None infers it, up to
    `infer_up_to` (see vocabulary.run_vocab_size). Either way an id outside it is a
    ShardwiseError naming its file and line.
    """
    corpus = _cached(path, max_len, long_sequences, eval_fraction, seed, cache_dir)
    return replace(corpus, vocab_size=run_vocab_size(corpus, vocab_size, infer_up_to))


def _cached(
    path: Path | None,
    max_len: int,
    long_sequences: str,
    eval_fraction: float,
    seed: int,
    cache_dir: Path | None,
) -> PreparedCorpus:
    """The prepared corpus, its vocabulary not yet decided: that is the caller's, per run."""
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
            groups["train"],
            groups["eval"],
            meta["largest_id"] + 1,
            FitReport(**meta["fit"]),
            meta["largest_id"],
            path,
        )
    corpus = _prepare(path, max_len, long_sequences, eval_fraction, seed)
    meta = {"largest_id": corpus.largest_id, "fit": asdict(corpus.fit)}
    # An unwritable cache only costs the next run the time to tokenise again.
    with contextlib.suppress(OSError):
        save_sequences(entry, {"train": corpus.train, "eval": corpus.eval}, meta)
    return corpus


def _prepare(
    path: Path | None, max_len: int, long_sequences: str, eval_fraction: float, seed: int
) -> PreparedCorpus:
    sequences = read_sequences(path)
    # Every id read, also those in sequences fitting drops: a bad id is bad data wherever it is.
    largest = max((int(seq.max()) for seq in sequences if len(seq)), default=0)
    raw_train, raw_eval = split_train_eval(sequences, eval_fraction, seed)
    train, train_report = fit_to_max_length(raw_train, max_len, long_sequences)
    held_out, eval_report = fit_to_max_length(raw_eval, max_len, long_sequences)
    if not train:
        source = path or "the default corpus"
        raise ShardwiseError(f"--data {source}: no training sequence has the 2 tokens needed")
    fit = _sum_reports(train_report, eval_report)
    return PreparedCorpus(train, held_out, largest + 1, fit, largest, path)


def _sum_reports(first: FitReport, second: FitReport) -> FitReport:
    counts = {
        f.name: getattr(first, f.name) + getattr(second, f.name)
        for f in fields(FitReport)
        if f.name.startswith(("n_", "tokens_"))
    }
    return replace(first, **counts)
