"""A training micro-batch: padded next-token inputs and targets, with the counts the loss needs.

batch = collate([np.array([1, 2, 3]), np.array([4, 5])], step_tokens=3)
batch.tokens.shape, batch.n_tokens  # (torch.Size([2, 2]), 3)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Batch:
    """Inputs `tokens` [B, T] and `targets` [B, T] (IGNORE_INDEX where padded).

    `step_tokens` is the number of real targets in the whole optimizer step, summed over every rank
    and micro-step: dividing the summed loss by it makes the gradient exactly that of the global
    token-mean loss, whatever the split over ranks and micro-steps.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    step_tokens: int
    position: tuple[int, int] = (0, 0)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def n_slots(self) -> int:
        return self.targets.numel()

    @property
    def padded(self) -> bool:
        return self.n_tokens < self.n_slots

    def model_lengths(self, device: torch.device) -> torch.Tensor | None:
        """Lengths for the model to pack by, or None to run plainly over the padding.

        Trailing padding never changes a causal model's real outputs, so packing is only about
        speed: cuDNN skips padded steps, but PyTorch's packed CPU LSTM ran 2.4x slower per batch
        than the plain one over ~50% padding, so on CPU we do not pack.
        """
        return self.lengths if self.padded and device.type == "cuda" else None

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        return replace(
            self,
            tokens=self.tokens.to(device, non_blocking=non_blocking),
            targets=self.targets.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return replace(self, tokens=self.tokens.pin_memory(), targets=self.targets.pin_memory())


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
