"""Turn batch plans into device-ready batches, in background workers when asked.

    loader = make_loader(sequences, sampler, device=torch.device("cpu"))
    batch = next(iter(loader))   # a Batch for this rank's first micro-step

The sampler yields whole `BatchRequest`s and the dataset answers each with a collated `Batch`, so
the request's step-level facts (token count, position, predicted rank costs) travel with the
batch through the workers.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shardwise.data.batch import Batch, collate, pack_collate
from shardwise.data.sampler import BatchRequest


class RequestDataset(Dataset):
    """Map-style dataset keyed by BatchRequest: each key is answered with a collated Batch.

    With `packing`, each batch packs its sequences into rows (`pack_collate`) instead of padding
    each to the longest; only models that take `positions` and `segment_ids` can use that.
    """

    def __init__(self, sequences: Sequence[np.ndarray], packing: bool = False) -> None:
        self.sequences = sequences
        self.packing = packing

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, request: BatchRequest) -> Batch:
        chosen = [self.sequences[i] for i in request.indices]
        batch = (pack_collate if self.packing else collate)(
            chosen, request.step_tokens, request.position
        )
        return replace(batch, rank_costs=request.rank_costs)


def _keep_batch(batch: Batch) -> Batch:
    return batch


def make_loader(
    sequences: Sequence[np.ndarray],
    requests: Iterable[BatchRequest],
    device: torch.device,
    num_workers: int = 0,
    packing: bool = False,
) -> DataLoader:
    """A DataLoader over `requests`: workers and prefetch when asked, pinned memory on CUDA."""
    return DataLoader(
        RequestDataset(sequences, packing),
        sampler=requests,
        batch_size=None,
        collate_fn=_keep_batch,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        worker_init_fn=_leave_stop_signals_to_the_trainer if num_workers else None,
    )


def _leave_stop_signals_to_the_trainer(_worker_id: int) -> None:
    """In a loading process: SIGTERM and Ctrl-C reach its whole process group, but stopping is
    the training process's to do (after the step, with a checkpoint); a loader killed first
    would end that step in an error. Loaders still exit when the trainer does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)  # forked with the trainer's signal pipe: not this process's to use
