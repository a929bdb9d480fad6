"""The vocabulary a run's model is built with, and the check that every token id is inside it.

    vocab = run_vocab_size(corpus, given=None)   # 256 for text; largest JSONL id + 1 up to 65536
    check_token_ids(corpus, 50_257, who="model 'gpt:tiny'")   # or ShardwiseError naming the line

An id at or above a model's vocabulary indexes past its embedding: an error deep inside every
worker, or, in a model that clamps or wraps ids, training on garbage. So it is checked in the
launcher against the corpus's largest id as read (one number, which the tokenisation cache
keeps); only when that fails is the file read again, to name the line of the first bad id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shardwise.data.corpus import default_paragraphs, numbered_sequences
from shardwise.data.tokenize import VOCAB_SIZE, encode
from shardwise.errors import ShardwiseError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from shardwise.data.prepare import PreparedCorpus

# The largest vocabulary inferred from the ids for a built-in model: a 65,536-way output layer
# is already a large share of a small model's step; one id of 10**5 would quietly make it 4x that.
MOST_INFERRED_VOCAB = 65_536
# The largest any run builds (--vocab-size's limit): ids beyond it are a mistake in the data.
MOST_VOCAB = 2**24


def run_vocab_size(
    corpus: PreparedCorpus, given: int | None, infer_up_to: int = MOST_INFERRED_VOCAB
) -> int:
    """The run's vocabulary: `given` (--vocab-size) once every id is inside it, else inferred.

        run_vocab_size(corpus, None)   # 256 for text; 1001 for JSONL ids up to 1000
        run_vocab_size(corpus, 300)    # 300, or ShardwiseError naming the line of id 300

    Inferred, it is 256 (bytes) or the largest id + 1 when that is more, up to `infer_up_to`;
    beyond that it is refused in one line naming the file, line and id, since a vocabulary that
    large is more likely a stray id than meant.
    """
    if given is not None:
        check_token_ids(corpus, given, who=f"--vocab-size {given}")
        return given
    needed = corpus.largest_id + 1
    if needed <= infer_up_to:
        return max(VOCAB_SIZE, needed)
    bad = _first_at_or_above(corpus, infer_up_to)
    if needed > MOST_VOCAB:
        raise ShardwiseError(
            f"{bad.where}: token id {bad.token} is beyond the largest vocabulary shardwise "
            f"builds ({MOST_VOCAB} ids){bad.others(corpus.largest_id)}; fix the data"
        )
    raise ShardwiseError(
        f"{bad.where}: token id {bad.token} would make a vocabulary of {needed}, above the "
        f"{infer_up_to} inferred for a built-in model (its output layer, and each step, grows "
        f"with it){bad.others(corpus.largest_id)}; pass --vocab-size {needed} if that "
        "vocabulary is meant, or fix the data"
    )


def check_token_ids(
    corpus: PreparedCorpus, vocab_size: int, who: str, fix: str | None = None
) -> None:
    """Refuse, in one line naming the file and line, a token id at or above `vocab_size`.

        check_token_ids(corpus, contract.vocab_size, who="model 'my_lm:build'")

    `who` says whose vocabulary it is; `fix` replaces the advice to pass a larger --vocab-size
    (e.g. for a model whose factory fixes its own vocabulary). Cheap when every id is inside:
    one comparison with the largest id read.
    """
    if corpus.largest_id < vocab_size:
        return
    bad = _first_at_or_above(corpus, vocab_size)
    needed = corpus.largest_id + 1
    if fix is None and needed <= MOST_VOCAB:
        fix = f"pass --vocab-size {needed} or more"
    raise ShardwiseError(
        f"{bad.where}: token id {bad.token} is outside the vocabulary of {vocab_size} ({who})"
        f"{bad.others(corpus.largest_id)}; {f'{fix}, or ' if fix else ''}fix the data"
    )


@dataclass(frozen=True)
class _OutOfRange:
    """The first line holding an id at or above a limit, that id, and how many lines do."""

    where: str  # "data.jsonl:7", or the corpus itself when no line is known
    token: int
    lines: int

    def others(self, largest: int) -> str:
        """A clause for the message when this line is not the only one (empty otherwise)."""
        more = self.lines - 1
        if not more:
            return ""
        return f" (and {more} more line{'s' if more > 1 else ''}; the largest id is {largest})"


def _first_at_or_above(corpus: PreparedCorpus, limit: int) -> _OutOfRange:
    """Read the corpus again for the lines holding an id >= `limit` (only when there is one)."""
    found: tuple[str, int] | None = None
    lines = 0
    for where, tokens in _sequences_with_places(corpus.source):
        over = np.flatnonzero(tokens >= limit)
        if over.size:
            lines += 1
            found = found or (where, int(tokens[over[0]]))
    if found is None:  # the file changed since it was read: name it, without a line
        return _OutOfRange(str(corpus.source or "the default corpus"), corpus.largest_id, 1)
    return _OutOfRange(*found, lines)


def _sequences_with_places(source: Path | None) -> Iterator[tuple[str, np.ndarray]]:
    if source is None:  # the default corpus is bytes: only a --vocab-size below 256 gets here
        for number, paragraph in enumerate(default_paragraphs(), start=1):
            yield f"the default corpus (paragraph {number})", encode(paragraph)
        return
    for number, tokens in numbered_sequences(source):
        yield f"{source}:{number}", tokens
