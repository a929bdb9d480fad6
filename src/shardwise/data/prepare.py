"""From a path (or nothing) to train and held-out sequences, with a note of what was changed.

corpus = prepare_corpus(None, max_len=256, long_sequences="split", eval_fraction=0.05, seed=0)
len(corpus.train), corpus.vocab_size, corpus.notes
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from shardwise.data.cache import cache_key, cache_path, load_sequences, save_sequences
from shardwise.data.corpus import CorpusSource, read_sequences, read_source
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
    here but the vocabulary) and later calls load it instead of tokenising the corpus again,
    once its digest matches these bytes and settings and its ids are inside its note (see
    data/cache.py); an entry that fails is rebuilt, never used. `vocab_size` (--vocab-size)
    must hold every token id; None infers it, up to `infer_up_to` (see
    vocabulary.run_vocab_size). Either way an id outside it is a ShardwiseError naming its file
    and line.
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
    source = read_source(path)
    if cache_dir is None:
        return _prepare(source, max_len, long_sequences, eval_fraction, seed)
    settings = {
        "max_len": max_len,
        "long_sequences": long_sequences,
        "eval_fraction": eval_fraction,
        "seed": seed,
    }
    # The entry is tied to these very bytes: its digest covers their hash and the settings.
    made_from = cache_key(source.digest, **settings)
    entry = cache_path(source.digest, cache_dir, **settings)
    if (hit := load_sequences(entry, made_from)) is not None and (
        corpus := _from_entry(*hit, path)
    ) is not None:
        return corpus
    corpus = _prepare(source, max_len, long_sequences, eval_fraction, seed)
    meta = {"largest_id": corpus.largest_id, "fit": asdict(corpus.fit)}
    # An unwritable cache only costs the next run the time to tokenise again.
    with contextlib.suppress(OSError):
        save_sequences(entry, {"train": corpus.train, "eval": corpus.eval}, meta, made_from)
    return corpus


def _from_entry(
    groups: dict[str, list[np.ndarray]], meta: dict, path: Path | None
) -> PreparedCorpus | None:
    """The corpus a cache entry holds, or None when its note and its tokens disagree.

    The vocabulary is checked against the largest id, so that comes from the tokens here, not
    from the note alone: the note may only add ids that fitting dropped.
    """
    try:
        train, held_out, noted = groups["train"], groups["eval"], meta["largest_id"]
        fit = FitReport(**meta["fit"])
    except (KeyError, TypeError):
        return None
    sequences = [seq for seq in (*train, *held_out) if len(seq)]
    smallest = min((int(seq.min()) for seq in sequences), default=0)
    largest = max((int(seq.max()) for seq in sequences), default=0)
    if not isinstance(noted, int) or isinstance(noted, bool) or smallest < 0 or largest > noted:
        return None
    return PreparedCorpus(train, held_out, noted + 1, fit, noted, path)


def _prepare(
    source: CorpusSource, max_len: int, long_sequences: str, eval_fraction: float, seed: int
) -> PreparedCorpus:
    sequences = read_sequences(source)
    # Every id read, also those in sequences fitting drops: a bad id is bad data wherever it is.
    largest = max((int(seq.max()) for seq in sequences if len(seq)), default=0)
    raw_train, raw_eval = split_train_eval(sequences, eval_fraction, seed)
    train, train_report = fit_to_max_length(raw_train, max_len, long_sequences)
    held_out, eval_report = fit_to_max_length(raw_eval, max_len, long_sequences)
    if not train:
        source_name = source.path or "the default corpus"
        raise ShardwiseError(f"--data {source_name}: no training sequence has the 2 tokens needed")
    fit = _sum_reports(train_report, eval_report)
    return PreparedCorpus(train, held_out, largest + 1, fit, largest, source.path)


def _sum_reports(first: FitReport, second: FitReport) -> FitReport:
    counts = {
        f.name: getattr(first, f.name) + getattr(second, f.name)
        for f in fields(FitReport)
        if f.name.startswith(("n_", "tokens_"))
    }
    return replace(first, **counts)
