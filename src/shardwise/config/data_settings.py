"""What a run trains on: the data, the model and how batches are formed. TrainConfig holds these
settings first, then the layout, the optimisation and the run directory's.

    config = TrainConfig(data="notes.txt", model="gru")
    config.tokens_per_batch   # 2048
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shardwise.data.defaults import DEFAULT_SORT_WINDOW


class DataSettings(BaseModel):
    """What to train on (a part of TrainConfig; see its fields' help)."""

    # allow_inf_nan: no float setting means anything as NaN or inf (--eval-fraction nan).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    data: Path | None = Field(
        None,
        description="Training text: a plain-text file (paragraphs separated by blank lines) or "
        "JSONL with a 'text' or 'tokens' field. Default: Python's own documentation text.",
    )
    model: str = Field(
        "lstm",
        description="Built-in model (lstm, gru, transformer) or 'package.module:factory' "
        "returning an nn.Module.",
    )
    vocab_size: int | None = Field(
        None,
        ge=2,
        le=2**24,
        description="Token ids the model knows (0 to N-1); an id at or above it is an error "
        "naming its file and line, before any worker starts. Default: your model's own output "
        "size; for the built-ins 256 (bytes), or the largest JSONL token id + 1 when that is "
        "more, up to 65536 (a larger one needs this flag).",
    )
    input_layout: Literal["auto", "batch-first", "time-major"] = Field(
        "auto",
        description="How your model takes tokens: batch-first [batch, time] or time-major "
        "[time, batch] (as pytorch/examples' word_language_model). auto: found by a probe call "
        "where it is unambiguous.",
    )
    model_output: str | None = Field(
        None,
        description="Where the logits are in your model's output when it returns a tuple or a "
        "dict and more than one tensor could be them: an index (0) or a key (logits).",
    )
    max_len: int = Field(256, ge=2, description="Longest sequence in tokens; longer ones are cut.")
    long_sequences: Literal["split", "truncate"] = Field(
        "split", description="What to do with sequences longer than --max-len."
    )
    eval_fraction: float = Field(
        0.05, ge=0.0, le=0.5, description="Share of sequences held out to measure eval loss."
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="Steps between held-out evaluations during training, logged to the metrics "
        "and plots (0: only at the end).",
    )
    eval_tokens: int = Field(
        200_000,
        ge=0,
        description="Most held-out tokens one evaluation reads (a fixed, seeded subset of the "
        "held-out sequences; 0: all of them).",
    )
    batching: Literal["tokens", "fixed"] = Field(
        "tokens",
        description="tokens: batches by token budget from length buckets, dealt so every rank "
        "has equal work; fixed: --batch-size sequences per rank, padded (the classic recipe).",
    )
    tokens_per_batch: int = Field(
        2048, ge=1, description="Token budget per rank per micro-step (--batching tokens)."
    )
    packing: bool | None = Field(
        None,
        description="Pack several sequences into one row (Transformer only; attention never "
        "crosses a sequence). Default: on for the transformer.",
    )
    sort_window: int = Field(
        DEFAULT_SORT_WINDOW,
        ge=1,
        description="Sequences sorted by length together when forming token batches.",
    )
    corpus_cache: bool = Field(True, description="Cache the tokenised corpus between runs.")
