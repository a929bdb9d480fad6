"""A training micro-batch: padded or packed next-token inputs and targets, with loss counts.

batch = collate([np.array([1, 2, 3]), np.array([4, 5])], step_tokens=3)
batch.tokens.shape, batch.n_tokens  # (torch.Size([2, 2]), 3)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from shardwise.data.packing import pack_rows
from shardwise.loss import IGNORE_INDEX

PADDING_SEGMENT = -1


@dataclass(frozen=True)
class Batch:
    """Inputs `tokens` [B, T] and `targets` [B, T] (IGNORE_INDEX where padded).

    `step_tokens` is the number of real targets in the whole optimizer step, summed over every rank
    and micro-step: dividing the summed loss by it makes the gradient exactly that of the global
    token-mean loss, whatever the split over ranks and micro-steps.

    `lengths` holds each sequence's target count: one per row when padded, one per packed
    sequence when packed. A packed batch also has `positions` (restarting at 0 for each sequence)
    and `segment_ids` (which sequence of its row a token is, PADDING_SEGMENT for padding), which
    the model needs to keep the sequences of a row apart. `rank_costs` is every rank's predicted
    compute for the step, when the sampler balanced it.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    step_tokens: int
    position: tuple[int, int] = (0, 0)
    positions: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    rank_costs: tuple[float, ...] = ()

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def n_slots(self) -> int:
        return self.targets.numel()

    @property
    def padded(self) -> bool:
        return self.n_tokens < self.n_slots

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    def model_lengths(self, device: torch.device) -> torch.Tensor | None:
        """Lengths for the model to pack by, or None to run plainly over the padding.

        Trailing padding never changes a causal model's real outputs, so packing is only about
        speed: cuDNN skips padded steps, but PyTorch's packed CPU LSTM ran 2.4x slower per batch
        than the plain one over ~50% padding, so on CPU we do not pack. Packed rows have no
        per-row length: a model must get their `model_kwargs`, or it would attend across the
        sequences of a row, so asking for lengths alone is refused.
        """
        if self.packed:
            raise ValueError("a packed batch needs model(tokens, **batch.model_kwargs(device))")
        return self.lengths if self.padded and device.type == "cuda" else None

    def model_kwargs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Keyword arguments for `model(batch.tokens, **kwargs)` beyond the tokens.

        logits = model(batch.tokens, **batch.model_kwargs(batch.tokens.device))

        Packed rows give `positions` and `segment_ids` (TransformerLM takes them); padded batches
        give `lengths` where packing them pays (see `model_lengths`), else nothing, so a model
        that takes only tokens works with every padded batch.
        """
        if self.packed:
            return {"positions": self.positions, "segment_ids": self.segment_ids}
        lengths = self.model_lengths(device)
        return {} if lengths is None else {"lengths": lengths}

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return self._map(torch.Tensor.pin_memory)

    def _map(self, move: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        # `lengths` stays on the CPU: pack_padded_sequence wants it there.
        return replace(
            self,
            tokens=move(self.tokens),
            targets=move(self.targets),
            positions=None if self.positions is None else move(self.positions),
            segment_ids=None if self.segment_ids is None else move(self.segment_ids),
        )


def collate(
    sequences: list[np.ndarray], step_tokens: int, position: tuple[int, int] = (0, 0)
) -> Batch:
    """Pad sequences into one next-token-prediction batch (inputs seq[:-1], targets seq[1:])."""
    lengths = torch.tensor([len(seq) - 1 for seq in sequences], dtype=torch.long)
    width = int(lengths.max())
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, seq in enumerate(sequences):
        values = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        tokens[row, : len(seq) - 1] = values[:-1]
        targets[row, : len(seq) - 1] = values[1:]
    return Batch(tokens, targets, lengths, step_tokens, position)


def pack_collate(
    sequences: list[np.ndarray],
    step_tokens: int,
    position: tuple[int, int] = (0, 0),
    row_len: int | None = None,
) -> Batch:
    """Pack sequences into rows of at most `row_len` inputs (default: the longest sequence's).

    batch = pack_collate([np.arange(5), np.arange(3), np.arange(2)], step_tokens=7)
    batch.segment_ids   # [[0, 0, 0, 0], [0, 0, 1, -1]]: rows of 4, the last slot padding

    Each sequence keeps its own next-token pairs (inputs seq[:-1], targets seq[1:]), so no
    target ever crosses into the next sequence of the row. Rows are as wide as the fullest one.
    When no two sequences share a row, this is the padded batch `collate` gives: the model then
    runs its plain causal attention, which needs no mask.
    """
    inputs = np.array([len(seq) - 1 for seq in sequences], dtype=np.int64)
    rows = pack_rows(inputs, int(inputs.max()) if row_len is None else row_len)
    if len(rows) == len(sequences):
        return collate(sequences, step_tokens, position)
    width = max(int(inputs[row].sum()) for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segment_ids = torch.full((len(rows), width), PADDING_SEGMENT, dtype=torch.long)
    order = [sample for row in rows for sample in row]
    for r, row in enumerate(rows):
        start = 0
        for segment, sample in enumerate(row):
            values = torch.from_numpy(np.asarray(sequences[sample], dtype=np.int64))
            span = slice(start, start + len(values) - 1)
            tokens[r, span] = values[:-1]
            targets[r, span] = values[1:]
            positions[r, span] = torch.arange(len(values) - 1)
            segment_ids[r, span] = segment
            start = span.stop
    lengths = torch.from_numpy(inputs[order])
    return Batch(tokens, targets, lengths, step_tokens, position, positions, segment_ids)
