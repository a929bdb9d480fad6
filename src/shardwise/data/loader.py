"""Turn batch plans into device-ready batches, in background workers when asked.

    loader = make_loader(sequences, sampler, device=torch.device("cpu"))
    batch = next(iter(loader))   # a Batch for this rank's first micro-step

The sampler yields whole `BatchRequest`s and the dataset answers each with a collated `Batch`, so
the request's step-level facts (token count, position) travel with the batch through the workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shardwise.data.batch import Batch, collate
from shardwise.data.sampler import BatchRequest


class RequestDataset(Dataset):
    """Map-style dataset keyed by BatchRequest: each key is answered with a collated Batch."""

    def __init__(self, sequences: Sequence[np.ndarray]) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, request: BatchRequest) -> Batch:
        chosen = [self.sequences[i] for i in request.indices]
        return collate(chosen, request.step_tokens, request.position)


def _keep_batch(batch: Batch) -> Batch:
    return batch


def make_loader(
    sequences: Sequence[np.ndarray],
    requests: Iterable[BatchRequest],
    device: torch.device,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over `requests`: workers and prefetch when asked, pinned memory on CUDA."""
    return DataLoader(
        RequestDataset(sequences),
        sampler=requests,
        batch_size=None,
        collate_fn=_keep_batch,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
